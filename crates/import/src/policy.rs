//! Glance's default policy ("secure RBAC", Glance 2023.1 and later:
//! `glance/policies/base.py` and `image.py`), for the roles `admin`, `member` and
//! `reader`.
//!
//! | rule | who |
//! |---|---|
//! | `get_images` | admin, or reader (of the caller's project) |
//! | `get_image` | admin, or reader of the owner, of a member project, or of any project for a public, community or shared image |
//! | `download_image` | as `get_image` with member instead of reader |
//! | `add_image` | admin, or member of the project that will own it |
//! | `modify_image`, `delete_image`, `upload_image`, `deactivate`, `reactivate`, `add_member`, `delete_member`, `communitize_image` | admin, or member of the owner |
//! | `publicize_image` | admin |
//! | `get_member`, `get_members` | admin, or reader of the owner or of the member project |
//! | `modify_member` | admin, or member of the member project |
//!
//! `admin` is Glance's `context_is_admin` (`role:admin`, on whatever project: Glance's
//! defaults do not look at `is_admin_project`). Keystone expands implied roles into
//! the token (`admin` implies `member` implies `reader` after `keystone-manage
//! bootstrap`), so the rules name one role each. The visibility rules (who sees a
//! private or shared image at all) stay in [`crate::service`], as in Glance's
//! database layer; a rule that fails on an image the caller cannot see answers 404
//! there, one that fails on a visible image 403 with Glance's sentence ([`forbidden`]).

use crate::error::Error;
use crate::service::Caller;

/// Glance's role names.
pub const ADMIN: &str = "admin";
/// The role that writes a project's images.
pub const MEMBER: &str = "member";
/// The read-only role.
pub const READER: &str = "reader";

/// A policy rule, named as Glance names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// `POST /v2/images`.
    AddImage,
    /// `GET /v2/images/{id}` (and anything that reads an image).
    GetImage,
    /// `GET /v2/images`.
    GetImages,
    /// `PATCH`, tags, import.
    ModifyImage,
    /// `DELETE /v2/images/{id}`.
    DeleteImage,
    /// `PUT /file`, `PUT /stage`.
    UploadImage,
    /// `GET /file`.
    DownloadImage,
    /// Making an image public.
    PublicizeImage,
    /// Making an image community.
    CommunitizeImage,
    /// `POST /members`.
    AddMember,
    /// `DELETE /members/{member}`.
    DeleteMember,
    /// `GET /members/{member}`.
    GetMember,
    /// `GET /members`.
    GetMembers,
    /// `PUT /members/{member}` (the member's answer).
    ModifyMember,
}

impl Rule {
    /// Glance's name of the rule.
    pub fn name(self) -> &'static str {
        match self {
            Rule::AddImage => "add_image",
            Rule::GetImage => "get_image",
            Rule::GetImages => "get_images",
            Rule::ModifyImage => "modify_image",
            Rule::DeleteImage => "delete_image",
            Rule::UploadImage => "upload_image",
            Rule::DownloadImage => "download_image",
            Rule::PublicizeImage => "publicize_image",
            Rule::CommunitizeImage => "communitize_image",
            Rule::AddMember => "add_member",
            Rule::DeleteMember => "delete_member",
            Rule::GetMember => "get_member",
            Rule::GetMembers => "get_members",
            Rule::ModifyMember => "modify_member",
        }
    }

    /// Who passes the rule, for the 403's message.
    pub fn who(self) -> &'static str {
        match self {
            Rule::PublicizeImage => "the admin role",
            Rule::GetImages => "the reader role",
            Rule::GetImage => "the reader role on the owner or a member project",
            Rule::DownloadImage => "the member role on the owner or a member project",
            Rule::AddImage => "the member role on the project that will own the image",
            Rule::ModifyImage
            | Rule::DeleteImage
            | Rule::UploadImage
            | Rule::CommunitizeImage
            | Rule::AddMember
            | Rule::DeleteMember => "the member role on the image's owner project",
            Rule::GetMember | Rule::GetMembers => {
                "the reader role on the image's owner project or the member project"
            }
            Rule::ModifyMember => "the member role on the member project",
        }
    }
}

/// What a rule is checked against (Glance's `ImageTarget`).
#[derive(Clone, Copy, Debug, Default)]
pub struct Target<'a> {
    /// The image's owner (for `add_image`: the owner it will have).
    pub owner: Option<&'a str>,
    /// The image's visibility.
    pub visibility: &'a str,
    /// Whether the caller's project is a member of the image (whatever its answer).
    pub caller_is_member: bool,
}

/// Whether `caller` passes `rule` on `target`.
pub fn allows(caller: &Caller, rule: Rule, t: &Target<'_>) -> bool {
    if caller.has_role(ADMIN) {
        return true;
    }
    let own = t.owner == Some(caller.project_id.as_str());
    let open = matches!(t.visibility, "public" | "community" | "shared");
    match rule {
        Rule::PublicizeImage => false,
        Rule::GetImages => caller.has_role(READER),
        Rule::GetImage => caller.has_role(READER) && (own || t.caller_is_member || open),
        Rule::DownloadImage => caller.has_role(MEMBER) && (own || t.caller_is_member || open),
        Rule::AddImage
        | Rule::ModifyImage
        | Rule::DeleteImage
        | Rule::UploadImage
        | Rule::CommunitizeImage
        | Rule::AddMember
        | Rule::DeleteMember => caller.has_role(MEMBER) && own,
        Rule::GetMember | Rule::GetMembers => {
            caller.has_role(READER) && (own || t.caller_is_member)
        }
        Rule::ModifyMember => caller.has_role(MEMBER) && t.caller_is_member,
    }
}

/// Glance's 403 for a failed rule (`exception.Forbidden` of oslo.policy's refusal),
/// followed by who passes it.
pub fn forbidden(rule: Rule) -> Error {
    let or_admin = if rule == Rule::PublicizeImage {
        ""
    } else {
        " (or admin)"
    };
    Error::Forbidden(format!(
        "You are not authorized to complete {} action. It needs {}{or_admin}.",
        rule.name(),
        rule.who()
    ))
}

/// `Ok` when `caller` passes `rule` on `target`, else Glance's 403.
pub fn enforce(caller: &Caller, rule: Rule, target: &Target<'_>) -> Result<(), Error> {
    if allows(caller, rule, target) {
        Ok(())
    } else {
        Err(forbidden(rule))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(project: &str, roles: &[&str]) -> Caller {
        Caller {
            project_id: project.into(),
            user_id: format!("user-of-{project}"),
            admin: roles.contains(&ADMIN),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            request_id: String::new(),
        }
    }

    /// Keystone's tokens after `bootstrap`: implied roles expanded.
    fn admin() -> Caller {
        caller("x", &[ADMIN, MEMBER, READER])
    }
    fn member(p: &str) -> Caller {
        caller(p, &[MEMBER, READER])
    }
    fn reader(p: &str) -> Caller {
        caller(p, &[READER])
    }

    const ALL: [Rule; 14] = [
        Rule::AddImage,
        Rule::GetImage,
        Rule::GetImages,
        Rule::ModifyImage,
        Rule::DeleteImage,
        Rule::UploadImage,
        Rule::DownloadImage,
        Rule::PublicizeImage,
        Rule::CommunitizeImage,
        Rule::AddMember,
        Rule::DeleteMember,
        Rule::GetMember,
        Rule::GetMembers,
        Rule::ModifyMember,
    ];

    fn image<'a>(owner: &'a str, visibility: &'a str, member: bool) -> Target<'a> {
        Target {
            owner: Some(owner),
            visibility,
            caller_is_member: member,
        }
    }

    /// The rules `c` passes on `t`, by name.
    fn passes(c: &Caller, t: &Target<'_>) -> Vec<&'static str> {
        ALL.iter()
            .filter(|r| allows(c, **r, t))
            .map(|r| r.name())
            .collect()
    }

    #[test]
    fn admin_passes_every_rule_on_any_project() {
        for t in [image("a", "private", false), image("b", "public", false)] {
            assert_eq!(passes(&admin(), &t).len(), ALL.len());
        }
    }

    #[test]
    fn member_writes_its_own_project_but_never_publicizes() {
        let own = image("a", "private", false);
        assert_eq!(
            passes(&member("a"), &own),
            [
                "add_image",
                "get_image",
                "get_images",
                "modify_image",
                "delete_image",
                "upload_image",
                "download_image",
                "communitize_image",
                "add_member",
                "delete_member",
                "get_member",
                "get_members",
            ]
        );
    }

    #[test]
    fn reader_only_reads_and_cannot_download() {
        assert_eq!(
            passes(&reader("a"), &image("a", "private", false)),
            ["get_image", "get_images", "get_member", "get_members"]
        );
        assert_eq!(
            passes(&reader("b"), &image("a", "public", false)),
            ["get_image", "get_images"]
        );
    }

    #[test]
    fn other_projects_read_shared_images_and_members_answer() {
        // B, a member project of A's shared image.
        assert_eq!(
            passes(&member("b"), &image("a", "shared", true)),
            [
                "get_image",
                "get_images",
                "download_image",
                "get_member",
                "get_members",
                "modify_member",
            ]
        );
        // C, not a member: the policy lets it read a shared image (the visibility
        // check in the service hides it), but not its members.
        assert_eq!(
            passes(&member("c"), &image("a", "shared", false)),
            ["get_image", "get_images", "download_image"]
        );
        assert_eq!(
            passes(&member("c"), &image("a", "private", false)),
            ["get_images"]
        );
        assert_eq!(
            passes(&member("c"), &image("a", "community", false)),
            ["get_image", "get_images", "download_image"]
        );
    }

    #[test]
    fn a_token_without_glance_roles_passes_nothing() {
        let c = caller("a", &["load-balancer_member"]);
        assert!(passes(&c, &image("a", "public", true)).is_empty());
    }

    #[test]
    fn refusal_reads_as_glance() {
        let e = enforce(&reader("a"), Rule::AddImage, &image("a", "private", false));
        assert_eq!(
            e,
            Err(Error::Forbidden(
                "You are not authorized to complete add_image action. It needs the member \
                 role on the project that will own the image (or admin)."
                    .into()
            ))
        );
    }
}

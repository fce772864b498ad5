//! Image members: the projects a `shared` image is offered to, and their answers
//! (Glance's `ImageMembersController` with its default policy). The owner (or an
//! admin) adds and removes members and sees them all; a member sees and answers its
//! own membership only (pending, accepted, rejected). A member sees the image
//! whatever its answer; image lists show it only as `member_status` asks
//! (accepted by default), see [`Service::list_images`].

use super::{Caller, Service};
use crate::db::{now, Image, Member, MemberAdded};
use crate::error::{Error, Result};
use crate::policy::{self, Rule};

/// Most members an image may have (Glance's `image_member_quota` default).
pub const MEMBER_QUOTA: u64 = 128;

/// The answers a member may give.
pub const MEMBER_STATUSES: &[&str] = &["pending", "accepted", "rejected"];

/// Longest member id (Glance's `image_members.member` column).
const MAX_MEMBER_LEN: usize = 255;

impl Service {
    /// Whether `caller` owns `img` or is an admin.
    fn owns(caller: &Caller, img: &Image) -> bool {
        caller.admin || img.owner.as_deref() == Some(caller.project_id.as_str())
    }

    /// The image `id`, visible to `caller` and `shared` (only shared images have
    /// members: 403 otherwise, as Glance).
    fn shared_image(&self, caller: &Caller, id: &str) -> Result<Image> {
        let img = self.image_for(caller, id)?;
        if img.visibility != "shared" {
            return Err(Error::Forbidden(format!(
                "Error fetching members of image {id}: Only shared images have members (this one is {}); make it shared first: PATCH /visibility to \"shared\"",
                img.visibility
            )));
        }
        Ok(img)
    }

    /// The membership of `member` in `img`, which `caller` may look at when it
    /// owns the image or is that member.
    fn lookup_member(&self, caller: &Caller, img: &Image, member: &str) -> Result<Member> {
        if !Self::owns(caller, img) && caller.project_id != member {
            return Err(Error::Forbidden(format!(
                "You are not authorized to lookup the members of the image {}.",
                img.id
            )));
        }
        self.db
            .member(&img.id, member)
            .map_err(Error::Internal)?
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "{member} not found in the member list of the image {}.",
                    img.id
                ))
            })
    }

    /// `GET /v2/images/{id}/members`: every member for the owner, the caller's own
    /// membership for a member.
    pub fn list_members(&self, caller: &Caller, id: &str) -> Result<Vec<Member>> {
        let img = self.shared_image(caller, id)?;
        let members = self.db.members(id).map_err(Error::Internal)?;
        let is_member = members.iter().any(|m| m.member == caller.project_id);
        policy::enforce(caller, Rule::GetMembers, &Self::target(&img, is_member))?;
        if Self::owns(caller, &img) {
            return Ok(members);
        }
        let own: Vec<Member> = members
            .into_iter()
            .filter(|m| m.member == caller.project_id)
            .collect();
        if own.is_empty() {
            return Err(Error::Forbidden(format!(
                "Not allowed to list members for image {id}."
            )));
        }
        Ok(own)
    }

    /// `GET /v2/images/{id}/members/{member}`: 404 also where the caller may not
    /// look (as Glance, so as not to tell who the members are).
    pub fn get_member(&self, caller: &Caller, id: &str, member: &str) -> Result<Member> {
        let img = self.shared_image(caller, id)?;
        let is_member = self
            .db
            .member(id, &caller.project_id)
            .map_err(Error::Internal)?
            .is_some();
        policy::enforce(caller, Rule::GetMember, &Self::target(&img, is_member))
            .and_then(|()| self.lookup_member(caller, &img, member))
            .map_err(|e| match e {
                Error::Forbidden(m) => Error::NotFound(m),
                other => other,
            })
    }

    /// `POST /v2/images/{id}/members`: the owner (or an admin) offers the image to
    /// project `member`, whose answer starts `pending`.
    pub fn add_member(&self, caller: &Caller, id: &str, member: &str) -> Result<Member> {
        let img = self.shared_image(caller, id)?;
        policy::enforce(caller, Rule::AddMember, &Self::target(&img, false))?;
        if !Self::owns(caller, &img) {
            return Err(Error::Forbidden(format!(
                "Not allowed to create members for image {id}: only its owner may share it."
            )));
        }
        if member.is_empty() {
            return Err(Error::BadRequest("Member can't be empty".into()));
        }
        if member.chars().count() > MAX_MEMBER_LEN {
            return Err(Error::BadRequest(format!(
                "Member ids have at most {MAX_MEMBER_LEN} characters."
            )));
        }
        let t = now();
        let m = Member {
            image_id: img.id.clone(),
            member: member.to_string(),
            status: "pending".into(),
            created_at: t.clone(),
            updated_at: t,
        };
        match self
            .db
            .add_member(&m, MEMBER_QUOTA)
            .map_err(Error::Internal)?
        {
            MemberAdded::Added => Ok(m),
            MemberAdded::Duplicate => Err(Error::Conflict(format!(
                "Member {member} is duplicated for image {id}"
            ))),
            MemberAdded::Limit => Err(Error::TooLarge(format!(
                "Image member limit exceeded for image {id}: it has {MEMBER_QUOTA} members already; remove one first"
            ))),
            MemberAdded::NoImage => Err(Error::NotFound(format!("No image found with ID {id}"))),
        }
    }

    /// `PUT /v2/images/{id}/members/{member}`: the member (or an admin) answers.
    pub fn update_member(
        &self,
        caller: &Caller,
        id: &str,
        member: &str,
        status: &str,
    ) -> Result<Member> {
        let img = self.shared_image(caller, id)?;
        self.lookup_member(caller, &img, member)?;
        if !MEMBER_STATUSES.contains(&status) {
            return Err(Error::BadRequest(format!(
                "Incorrect request: Status must be \"pending\", \"accepted\" or \"rejected\", not \"{status}\"."
            )));
        }
        if !caller.admin && caller.project_id != member {
            return Err(Error::Forbidden(format!(
                "Not allowed to update members for image {id}: only the member {member} answers for itself."
            )));
        }
        policy::enforce(caller, Rule::ModifyMember, &Self::target(&img, true))?;
        if !self
            .db
            .set_member_status(id, member, status)
            .map_err(Error::Internal)?
        {
            return Err(Error::NotFound(format!(
                "{member} not found in the member list of the image {id}."
            )));
        }
        self.lookup_member(caller, &img, member)
    }

    /// `DELETE /v2/images/{id}/members/{member}`: the owner (or an admin) withdraws
    /// the offer.
    pub fn remove_member(&self, caller: &Caller, id: &str, member: &str) -> Result<()> {
        let img = self.shared_image(caller, id)?;
        self.lookup_member(caller, &img, member)?;
        policy::enforce(caller, Rule::DeleteMember, &Self::target(&img, false))?;
        if !Self::owns(caller, &img) {
            return Err(Error::Forbidden(format!(
                "Not allowed to delete members for image {id}: only its owner may."
            )));
        }
        if !self.db.remove_member(id, member).map_err(Error::Internal)? {
            return Err(Error::NotFound(format!(
                "{member} not found in the member list of the image {id}."
            )));
        }
        Ok(())
    }
}

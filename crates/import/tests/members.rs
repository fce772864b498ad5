//! Image members as Glance's Image API v2 has them, over real HTTP on loopback: the
//! owner shares a `shared` image with another project, which sees it listed only
//! once it accepts (and not after it rejects), downloads it, and answers for itself
//! only; only the owner adds and removes members; members are per project; deleting
//! the image removes its members; the member schemas. Run on SQLite and, with
//! `cargo xtask test`, on PostgreSQL.

mod common;

use common::{Vimport, TOKEN};
use serde_json::Value;

const ALICE: &str = "tok-alice";
const BOB: &str = "tok-bob";
const CAROL: &str = "tok-carol";
const TOKENS: &str = "tok-alice:p-alice,tok-bob:p-bob,tok-carol:p-carol";

fn launch(dir: &std::path::Path) -> Vimport {
    Vimport::start(dir, &[("VIMPORT_TOKENS", TOKENS)])
}

/// The ids of `token`'s image list with `query`.
fn listed(v: &Vimport, token: &str, query: &str) -> Vec<String> {
    let (s, b) = v.as_user(token, "GET", &format!("/v2/images{query}"), None);
    assert_eq!(s, 200, "{b}");
    b["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_string())
        .collect()
}

fn shared_image(v: &Vimport) -> String {
    let (s, img) = v.as_user(
        ALICE,
        "POST",
        "/v2/images",
        Some(r#"{"name":"golden","disk_format":"raw","container_format":"bare","visibility":"shared"}"#),
    );
    assert_eq!(s, 201, "{img}");
    assert_eq!(img["visibility"], "shared");
    img["id"].as_str().unwrap().to_string()
}

fn share_accept_reject_and_download() {
    let dir = tempfile::tempdir().unwrap();
    let v = launch(dir.path());
    let id = shared_image(&v);
    let members = format!("/v2/images/{id}/members");
    let bob = format!("{members}/p-bob");
    let bytes: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
    let (s, _, b) = v.raw(
        "PUT",
        &format!("/v2/images/{id}/file"),
        &[
            ("X-Auth-Token", ALICE),
            ("Content-Type", "application/octet-stream"),
        ],
        Some(&bytes),
    );
    assert_eq!(s, 204, "{}", String::from_utf8_lossy(&b));

    // Before sharing, Bob does not see it at all.
    assert_eq!(
        v.as_user(BOB, "GET", &format!("/v2/images/{id}"), None).0,
        404
    );
    assert_eq!(v.as_user(BOB, "GET", &members, None).0, 404);

    // Alice shares it with Bob: pending, Glance's member view (200, as Glance).
    let (s, m) = v.as_user(ALICE, "POST", &members, Some(r#"{"member":"p-bob"}"#));
    assert_eq!(s, 200, "{m}");
    assert_eq!(m["member_id"], "p-bob");
    assert_eq!(m["image_id"], id.as_str());
    assert_eq!(m["status"], "pending");
    assert_eq!(m["schema"], "/v2/schemas/member");
    assert!(m["created_at"].as_str().unwrap().ends_with('Z'), "{m}");
    let (s, b) = v.as_user(ALICE, "POST", &members, Some(r#"{"member":"p-bob"}"#));
    assert_eq!(s, 409, "{b}");

    // Pending: Bob sees the image when he asks for it, but not in his list…
    assert_eq!(
        v.as_user(BOB, "GET", &format!("/v2/images/{id}"), None).0,
        200
    );
    assert!(listed(&v, BOB, "").is_empty());
    assert!(listed(&v, BOB, "?visibility=shared").is_empty());
    // …unless he asks for pending ones.
    assert_eq!(
        listed(&v, BOB, "?visibility=shared&member_status=pending"),
        [id.as_str()]
    );
    assert_eq!(listed(&v, BOB, "?member_status=all"), [id.as_str()]);
    let (s, b) = v.as_user(BOB, "GET", "/v2/images?member_status=maybe", None);
    assert_eq!(s, 400, "{b}");
    // Carol, not a member, sees nothing of it.
    assert_eq!(
        v.as_user(CAROL, "GET", &format!("/v2/images/{id}"), None).0,
        404
    );
    assert!(listed(&v, CAROL, "?member_status=all").is_empty());
    assert_eq!(v.as_user(CAROL, "GET", &bob, None).0, 404);

    // Only the member answers: not the owner, not another project.
    let (s, b) = v.as_user(ALICE, "PUT", &bob, Some(r#"{"status":"accepted"}"#));
    assert_eq!(s, 403, "{b}");
    assert_eq!(
        v.as_user(CAROL, "PUT", &bob, Some(r#"{"status":"accepted"}"#))
            .0,
        404
    );
    let (s, b) = v.as_user(BOB, "PUT", &bob, Some(r#"{"status":"maybe"}"#));
    assert_eq!(s, 400, "{b}");
    let (s, b) = v.as_user(BOB, "PUT", &bob, Some(r#"{"answer":"accepted"}"#));
    assert_eq!(s, 400, "{b}");
    assert_eq!(v.as_user(BOB, "GET", &bob, None).1["status"], "pending");

    // Bob accepts: listed by default, downloadable, byte for byte.
    let (s, m) = v.as_user(BOB, "PUT", &bob, Some(r#"{"status":"accepted"}"#));
    assert_eq!((s, m["status"].as_str()), (200, Some("accepted")), "{m}");
    assert_eq!(listed(&v, BOB, ""), [id.as_str()]);
    assert_eq!(listed(&v, BOB, "?visibility=shared"), [id.as_str()]);
    assert!(listed(&v, BOB, "?visibility=shared&member_status=pending").is_empty());
    let (s, _, back) = v.raw(
        "GET",
        &format!("/v2/images/{id}/file"),
        &[("X-Auth-Token", BOB)],
        None,
    );
    assert_eq!(s, 200);
    assert!(back == bytes, "the member downloads the owner's bytes");
    // A member may read but not change the image.
    let (s, _) = v.as_user(
        BOB,
        "PATCH",
        &format!("/v2/images/{id}"),
        Some(r#"[{"op":"replace","path":"/name","value":"mine"}]"#),
    );
    assert_eq!(s, 403);

    // Bob rejects: gone from his lists (still readable by id, as Glance).
    let (s, m) = v.as_user(BOB, "PUT", &bob, Some(r#"{"status":"rejected"}"#));
    assert_eq!((s, m["status"].as_str()), (200, Some("rejected")), "{m}");
    assert!(listed(&v, BOB, "").is_empty());
    assert!(listed(&v, BOB, "?visibility=shared").is_empty());
    assert_eq!(
        listed(&v, BOB, "?visibility=shared&member_status=rejected"),
        [id.as_str()]
    );
    // The owner lists her shared image whatever the answers.
    assert_eq!(listed(&v, ALICE, "?visibility=shared"), [id.as_str()]);

    // Made private again, the image is Alice's only, and has no member calls.
    let (s, _) = v.as_user(
        ALICE,
        "PATCH",
        &format!("/v2/images/{id}"),
        Some(r#"[{"op":"replace","path":"/visibility","value":"private"}]"#),
    );
    assert_eq!(s, 200);
    assert_eq!(
        v.as_user(BOB, "GET", &format!("/v2/images/{id}"), None).0,
        404
    );
    assert!(listed(&v, BOB, "?member_status=all").is_empty());
    let (s, b) = v.as_user(ALICE, "GET", &members, None);
    assert_eq!(s, 403, "{b}");
}

#[test]
fn a_member_sees_the_image_listed_only_once_it_accepts() {
    share_accept_reject_and_download();
}

#[test]
fn a_member_sees_the_image_listed_only_once_it_accepts_on_postgres() {
    common::on_postgres(share_accept_reject_and_download);
}

fn only_the_owner_adds_and_removes_members() {
    let dir = tempfile::tempdir().unwrap();
    let v = launch(dir.path());
    let id = shared_image(&v);
    let members = format!("/v2/images/{id}/members");

    // Members only on shared images.
    let (s, private) = v.as_user(
        ALICE,
        "POST",
        "/v2/images",
        Some(r#"{"name":"p","disk_format":"raw","container_format":"bare"}"#),
    );
    assert_eq!(s, 201);
    let (s, b) = v.as_user(
        ALICE,
        "POST",
        &format!("/v2/images/{}/members", private["id"].as_str().unwrap()),
        Some(r#"{"member":"p-bob"}"#),
    );
    assert_eq!(s, 403, "{b}");
    assert!(
        b.to_string().contains("Only shared images have members"),
        "{b}"
    );

    // Bodies as Glance's deserializer wants them.
    for (body, status) in [
        (r#"{}"#, 400),
        (r#"{"member":""}"#, 400),
        (r#"{"member":7}"#, 400),
        (r#"["p-bob"]"#, 400),
    ] {
        let (s, b) = v.as_user(ALICE, "POST", &members, Some(body));
        assert_eq!(s, status, "{body}: {b}");
    }
    let long = format!(r#"{{"member":"{}"}}"#, "x".repeat(256));
    assert_eq!(v.as_user(ALICE, "POST", &members, Some(&long)).0, 400);

    // A project that cannot see the image cannot add to it (404), and a member
    // cannot pass it on (403).
    assert_eq!(
        v.as_user(CAROL, "POST", &members, Some(r#"{"member":"p-carol"}"#))
            .0,
        404
    );
    assert_eq!(
        v.as_user(ALICE, "POST", &members, Some(r#"{"member":"p-bob"}"#))
            .0,
        200
    );
    let (s, b) = v.as_user(BOB, "POST", &members, Some(r#"{"member":"p-carol"}"#));
    assert_eq!(s, 403, "{b}");
    assert_eq!(
        v.as_user(ALICE, "POST", &members, Some(r#"{"member":"p-carol"}"#))
            .0,
        200
    );

    // The owner sees every member; a member only itself.
    let ids = |token: &str| -> Vec<String> {
        let (s, b) = v.as_user(token, "GET", &members, None);
        assert_eq!(s, 200, "{b}");
        assert_eq!(b["schema"], "/v2/schemas/members");
        let mut ids: Vec<String> = b["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["member_id"].as_str().unwrap().to_string())
            .collect();
        ids.sort();
        ids
    };
    assert_eq!(ids(ALICE), ["p-bob", "p-carol"]);
    assert_eq!(ids(TOKEN), ["p-bob", "p-carol"]);
    assert_eq!(ids(BOB), ["p-bob"]);
    assert_eq!(ids(CAROL), ["p-carol"]);
    // Bob cannot look at Carol's membership: 404, as Glance, not 403.
    assert_eq!(
        v.as_user(BOB, "GET", &format!("{members}/p-carol"), None).0,
        404
    );
    assert_eq!(
        v.as_user(BOB, "GET", &format!("{members}/p-bob"), None).0,
        200
    );
    assert_eq!(
        v.as_user(ALICE, "GET", &format!("{members}/p-nobody"), None)
            .0,
        404
    );

    // Only the owner removes: not the member itself, not another member.
    assert_eq!(
        v.as_user(BOB, "DELETE", &format!("{members}/p-bob"), None)
            .0,
        403
    );
    assert_eq!(
        v.as_user(BOB, "DELETE", &format!("{members}/p-carol"), None)
            .0,
        403
    );
    assert_eq!(
        v.as_user(ALICE, "DELETE", &format!("{members}/p-carol"), None)
            .0,
        204
    );
    assert_eq!(
        v.as_user(ALICE, "DELETE", &format!("{members}/p-carol"), None)
            .0,
        404
    );
    assert_eq!(ids(ALICE), ["p-bob"]);
    assert_eq!(
        v.as_user(CAROL, "GET", &format!("/v2/images/{id}"), None).0,
        404
    );
    // An admin answers for a member.
    let (s, m) = v.as_user(
        TOKEN,
        "PUT",
        &format!("{members}/p-bob"),
        Some(r#"{"status":"accepted"}"#),
    );
    assert_eq!((s, m["status"].as_str()), (200, Some("accepted")), "{m}");
    assert_eq!(listed(&v, BOB, ""), [id.as_str()]);

    // A member cannot delete the image; the owner's delete takes its members along
    // (an image of that id made again has none).
    assert_eq!(
        v.as_user(BOB, "DELETE", &format!("/v2/images/{id}"), None)
            .0,
        403
    );
    assert_eq!(
        v.as_user(ALICE, "DELETE", &format!("/v2/images/{id}"), None)
            .0,
        204
    );
    assert_eq!(v.as_user(BOB, "GET", &members, None).0, 404);
    assert!(listed(&v, BOB, "?member_status=all").is_empty());
    let (s, again) = v.as_user(
        ALICE,
        "POST",
        "/v2/images",
        Some(&format!(
            r#"{{"id":"{id}","name":"again","disk_format":"raw","container_format":"bare","visibility":"shared"}}"#
        )),
    );
    assert_eq!(s, 201, "{again}");
    let (s, b) = v.as_user(ALICE, "GET", &members, None);
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["members"], Value::Array(vec![]), "{b}");
    assert_eq!(
        v.as_user(BOB, "GET", &format!("/v2/images/{id}"), None).0,
        404
    );
}

#[test]
fn only_the_owner_adds_and_removes_members_and_delete_takes_them() {
    only_the_owner_adds_and_removes_members();
}

#[test]
fn only_the_owner_adds_and_removes_members_and_delete_takes_them_on_postgres() {
    common::on_postgres(only_the_owner_adds_and_removes_members);
}

#[test]
fn member_schemas() {
    let dir = tempfile::tempdir().unwrap();
    let v = launch(dir.path());
    let (s, m) = v.as_user(BOB, "GET", "/v2/schemas/member", None);
    assert_eq!(s, 200);
    assert_eq!(m["name"], "member");
    assert_eq!(
        m["properties"]["status"]["enum"],
        serde_json::json!(["pending", "accepted", "rejected"])
    );
    for p in [
        "member_id",
        "image_id",
        "created_at",
        "updated_at",
        "schema",
    ] {
        assert!(m["properties"][p].is_object(), "{p} in {m}");
    }
    let (s, c) = v.as_user(BOB, "GET", "/v2/schemas/members", None);
    assert_eq!(s, 200);
    assert_eq!(c["name"], "members");
    assert_eq!(c["properties"]["members"]["items"], m);
    assert_eq!(v.raw("GET", "/v2/schemas/member", &[], None).0, 401);
}

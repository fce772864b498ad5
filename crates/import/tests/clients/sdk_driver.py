"""openstacksdk driven by the Rust test `clients.rs`, one JSON request per line.

Usage: python3 sdk_driver.py URL TOKEN

Connects as the OpenStack clients do against a fixed endpoint (keystoneauth's
`admin_token` plugin, `image_endpoint_override`; version discovery happens on the
first call). Each line on stdin is `{"op": NAME, "args": {...}}`; each answer is one
line on stdout: `{"ok": RESULT}` or `{"error": {"type", "status", "message"}}`.
Resources are returned as their `to_dict()`, generators as lists.
"""

import json
import sys
import traceback

import openstack
from openstack import exceptions


def connect(url, token):
    return openstack.connection.Connection(
        auth_type="admin_token",
        auth={"endpoint": url, "token": token},
        image_endpoint_override=url,
        image_api_version="2",
        # No keystone: every service endpoint comes from the override.
        region_name="RegionOne",
    )


def as_json(value):
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, dict):
        return {k: as_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [as_json(v) for v in value]
    if hasattr(value, "to_dict"):
        return as_json(value.to_dict(computed=False))
    if hasattr(value, "__iter__"):
        return [as_json(v) for v in value]
    return repr(value)


def run(conn, op, a):
    img = conn.image
    if op == "create_image":
        # conn.image.create_image: PUT /file upload, or stage + import with
        # use_import, or web-download; no waiting (the test polls).
        name = a.pop("name")
        return img.create_image(name, allow_duplicates=True, **a)
    if op == "stage_image":
        # The SDK checks the status and formats of the Image object it is given, so
        # it gets the image first, as its users do.
        image = img.get_image(a["image"])
        with open(a["filename"], "rb") as data:
            return img.stage_image(image, data=data)
    if op == "import_image":
        image = img.get_image(a["image"])
        resp = img.import_image(image, method=a.get("method", "glance-direct"),
                                uri=a.get("uri"))
        return {"status_code": resp.status_code}
    if op == "get_image":
        return img.get_image(a["image"])
    if op == "find_image":
        return img.find_image(a["name_or_id"], ignore_missing=a.get("ignore_missing", True))
    if op == "images":
        return list(img.images(**a))
    if op == "update_image":
        image = a.pop("image")
        return img.update_image(image, **a)
    if op == "update_image_properties":
        image = a.pop("image")
        return img.update_image_properties(image=image, **a)
    if op == "add_tag":
        return img.add_tag(a["image"], a["tag"])
    if op == "remove_tag":
        return img.remove_tag(a["image"], a["tag"])
    if op == "image_tasks":
        return list(img.image_tasks(a["image"]))
    if op == "tasks":
        return list(img.tasks(**a))
    if op == "get_task":
        return img.get_task(a["task"])
    if op == "download_image":
        img.download_image(a["image"], output=a["output"])
        return None
    if op == "delete_image":
        return img.delete_image(a["image"], ignore_missing=False)
    if op == "add_member":
        return img.add_member(a["image"], member_id=a["member"])
    if op == "update_member":
        return img.update_member(a["member"], a["image"], status=a["status"])
    if op == "members":
        return list(img.members(a["image"]))
    if op == "get_member":
        return img.get_member(a["member"], a["image"])
    if op == "remove_member":
        return img.remove_member(a["member"], a["image"], ignore_missing=False)
    if op == "get_import_info":
        return img.get_import_info()
    raise ValueError(f"unknown op {op!r}")


def main():
    url, token = sys.argv[1], sys.argv[2]
    conn = connect(url, token)
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        try:
            out = {"ok": as_json(run(conn, req["op"], dict(req.get("args") or {})))}
        except exceptions.SDKException as e:
            out = {"error": {"type": type(e).__name__,
                             "status": getattr(e, "status_code", None),
                             "message": str(e),
                             "details": getattr(e, "details", None)}}
        except Exception as e:  # a client-side failure is a finding too
            out = {"error": {"type": type(e).__name__, "status": None,
                             "message": str(e),
                             "details": traceback.format_exc()}}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()

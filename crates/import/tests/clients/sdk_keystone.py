"""openstacksdk as a cloud user runs it: credentials from the OS_* environment
(OS_AUTH_URL, OS_USERNAME, ...), the image endpoint from Keystone's catalogue.
Driven by the Rust test `keystone.rs`.

Usage: python3 sdk_keystone.py OP JSON_ARGS
Prints one JSON line: {"ok": RESULT} or {"error": {"type", "status", "message"}}.
"""

import json
import sys

import openstack
from openstack import exceptions


def run(conn, op, a):
    img = conn.image
    if op == "project_id":
        return conn.current_project_id
    if op == "list":
        return [i.id for i in img.images(**a)]
    if op == "show":
        return img.get_image(a["image"]).to_dict(computed=False)
    if op == "accept":
        # The member answers for its own project.
        m = img.update_member(conn.current_project_id, a["image"], status=a["status"])
        return m.to_dict(computed=False)
    if op == "download":
        img.download_image(a["image"], output=a["output"])
        return None
    if op == "create":
        i = img.create_image(a["name"], disk_format="raw", container_format="bare",
                             allow_duplicates=True)
        return i.id
    raise ValueError("unknown op " + op)


def main():
    op, args = sys.argv[1], json.loads(sys.argv[2])
    # No cloud named: openstack.connect() takes the OS_* variables.
    conn = openstack.connect()
    try:
        out = {"ok": run(conn, op, args)}
    except exceptions.HttpException as e:
        out = {"error": {"type": type(e).__name__, "status": e.status_code,
                         "message": str(e)}}
    print(json.dumps(out, default=str))


main()

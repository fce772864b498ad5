-- Image members (Glance's `image_members`): the projects a `shared` image is offered
-- to, each with its own answer. The same file runs on both backends. A row goes with
-- its image (ON DELETE CASCADE); `member` is a project id as Glance's `member_id`
-- (at most 255 characters); `status` is the member's answer, `pending` until it
-- accepts or rejects.
CREATE TABLE image_members (
    image_id TEXT NOT NULL REFERENCES images (id) ON DELETE CASCADE,
    member TEXT NOT NULL CHECK (length(member) BETWEEN 1 AND 255),
    status TEXT NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'accepted', 'rejected')),
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (image_id, member));
CREATE INDEX image_members_member ON image_members (member);

//! The C declarations of `rados/librados.h` and `rbd/librbd.h` (Ceph 16) that this
//! crate calls. Only the functions used are declared; the types are opaque pointers
//! except the two list records, laid out as in the headers.

use std::ffi::{c_char, c_int, c_void};

/// `rados_t`.
pub type Rados = *mut c_void;
/// `rados_ioctx_t`.
pub type IoCtx = *mut c_void;
/// `rbd_image_t`.
pub type Image = *mut c_void;
/// `rbd_completion_t`.
pub type Completion = *mut c_void;
/// `rbd_callback_t`.
pub type Callback = Option<unsafe extern "C" fn(Completion, *mut c_void)>;

/// `rbd_image_spec_t` (librbd.h).
#[repr(C)]
pub struct ImageSpec {
    pub id: *mut c_char,
    pub name: *mut c_char,
}

/// `rbd_linked_image_spec_t` (librbd.h).
#[repr(C)]
pub struct LinkedImageSpec {
    pub pool_id: i64,
    pub pool_name: *mut c_char,
    pub pool_namespace: *mut c_char,
    pub image_id: *mut c_char,
    pub image_name: *mut c_char,
    pub trash: bool,
}

#[link(name = "rados")]
extern "C" {
    pub fn rados_create(cluster: *mut Rados, id: *const c_char) -> c_int;
    pub fn rados_conf_read_file(cluster: Rados, path: *const c_char) -> c_int;
    pub fn rados_conf_set(cluster: Rados, option: *const c_char, value: *const c_char) -> c_int;
    pub fn rados_connect(cluster: Rados) -> c_int;
    pub fn rados_shutdown(cluster: Rados);
    pub fn rados_ioctx_create(cluster: Rados, pool: *const c_char, ioctx: *mut IoCtx) -> c_int;
    pub fn rados_ioctx_destroy(ioctx: IoCtx);
}

#[link(name = "rbd")]
extern "C" {
    pub fn rbd_create(io: IoCtx, name: *const c_char, size: u64, order: *mut c_int) -> c_int;
    pub fn rbd_remove(io: IoCtx, name: *const c_char) -> c_int;
    pub fn rbd_rename(io: IoCtx, src: *const c_char, dst: *const c_char) -> c_int;
    pub fn rbd_list2(io: IoCtx, images: *mut ImageSpec, max: *mut usize) -> c_int;
    pub fn rbd_image_spec_list_cleanup(images: *mut ImageSpec, n: usize);
    pub fn rbd_open(
        io: IoCtx,
        name: *const c_char,
        image: *mut Image,
        snap: *const c_char,
    ) -> c_int;
    pub fn rbd_open_read_only(
        io: IoCtx,
        name: *const c_char,
        image: *mut Image,
        snap: *const c_char,
    ) -> c_int;
    pub fn rbd_close(image: Image) -> c_int;
    pub fn rbd_get_size(image: Image, size: *mut u64) -> c_int;
    pub fn rbd_read(image: Image, ofs: u64, len: usize, buf: *mut c_char) -> isize;
    pub fn rbd_flush(image: Image) -> c_int;
    pub fn rbd_aio_create_completion(arg: *mut c_void, cb: Callback, c: *mut Completion) -> c_int;
    pub fn rbd_aio_write(
        image: Image,
        off: u64,
        len: usize,
        buf: *const c_char,
        c: Completion,
    ) -> c_int;
    pub fn rbd_aio_wait_for_complete(c: Completion) -> c_int;
    pub fn rbd_aio_get_return_value(c: Completion) -> isize;
    pub fn rbd_aio_release(c: Completion);
    pub fn rbd_snap_create(image: Image, name: *const c_char) -> c_int;
    pub fn rbd_snap_remove(image: Image, name: *const c_char) -> c_int;
    pub fn rbd_snap_protect(image: Image, name: *const c_char) -> c_int;
    pub fn rbd_snap_unprotect(image: Image, name: *const c_char) -> c_int;
    pub fn rbd_snap_is_protected(image: Image, name: *const c_char, out: *mut c_int) -> c_int;
    pub fn rbd_list_children3(image: Image, images: *mut LinkedImageSpec, max: *mut usize)
        -> c_int;
    pub fn rbd_linked_image_spec_list_cleanup(images: *mut LinkedImageSpec, n: usize);
}

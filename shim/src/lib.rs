//! `containerd-shim-kestrel-v2`: containerd's runtime `io.containerd.kestrel.v2`.
//!
//! One binary, two roles: the containerd shim v2 (ttrpc task API, events) and the VMM
//! (through the `vmm` crate, on its own threads inside this process). A task is either an
//! ordinary container, whose processes the guest agent runs inside the VM, or a VM image
//! shipped as an OCI image (`/disk/*.qcow2`, KubeVirt's containerDisk layout).
//!
//! Pieces: [`task`] (the ttrpc edge) → [`model`] (states, exits, ordered [`events`]) →
//! [`guest`] (the seam) → [`host`] (the real guest: [`vm_image`], or [`rootfs`] +
//! [`agent`]).
//!
//! The library exists for the binary (`main.rs`) and the fuzz targets (`fuzz/`), which
//! reach the shim's readers of input it does not trust through [`untrusted`].

mod agent;
mod cgroups;
mod console;
mod error;
mod events;
mod forward;
mod guest;
mod hooks;
mod host;
mod logger;
mod model;
mod netns;
mod pod;
mod podnet;
mod rootfs;
pub mod service;
mod spec;
mod task;
mod vm_image;
mod volumes;

/// What the shim reads from the OCI spec containerd wrote and from the guest agent, which
/// a compromised guest controls: the fuzz targets' entry points.
pub mod untrusted {
    pub use crate::agent::{call, read_event_stream};
    pub use crate::spec::{container_vm, grouping, host_name, pod_vm, role, vm_spec};
}

/// Live heap bytes per thread, for the tests that bound the shim's memory growth: every
/// allocation and free of a thread is counted on that thread.
#[cfg(test)]
mod test_heap {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    thread_local! {
        static LIVE: Cell<isize> = const { Cell::new(0) };
    }

    fn count(bytes: isize) {
        // A thread being torn down has no counter any more: its frees go uncounted.
        let _ = LIVE.try_with(|c| c.set(c.get() + bytes));
    }

    struct Counting;

    // SAFETY: every call is forwarded to `System` with the same arguments; the counter is
    // a const-initialized thread-local Cell, which never allocates.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            // SAFETY: the caller's contract for `alloc`, passed on.
            let p = unsafe { System.alloc(layout) };
            if !p.is_null() {
                count(layout.size() as isize);
            }
            p
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: the caller's contract for `dealloc`, passed on.
            unsafe { System.dealloc(ptr, layout) };
            count(-(layout.size() as isize));
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            // SAFETY: the caller's contract for `realloc`, passed on.
            let p = unsafe { System.realloc(ptr, layout, new_size) };
            if !p.is_null() {
                count(new_size as isize - layout.size() as isize);
            }
            p
        }
    }

    #[global_allocator]
    static COUNTING: Counting = Counting;

    /// Bytes this thread allocated and has not freed.
    pub fn live() -> isize {
        LIVE.with(Cell::get)
    }
}

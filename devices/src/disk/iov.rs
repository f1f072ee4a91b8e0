//! Guest buffers handed to the kernel: a request's data goes between the disk file and
//! guest memory by `preadv`/`pwritev`, with no copy inside kestrel.
//!
//! [`IoBufs`] holds raw `iovec`s, never a Rust reference: the guest may change its memory
//! at any moment, so a `&[u8]` over it would be undefined behaviour, while the kernel
//! reading or writing it is what a DMA-capable disk does. Building an `IoBufs` from guest
//! memory checks that every byte is mapped; the mapping outlives the value (it borrows
//! the guest memory).

use std::fs::File;
use std::io;
use std::marker::PhantomData;
use std::os::fd::AsRawFd;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryError};

use crate::virtio::device::GuestMemoryMmap;

/// Most iovecs one `preadv`/`pwritev` takes (Linux's `UIO_MAXIOV`).
const IOV_MAX: usize = 1024;

/// The buffers of one request, in order, as the kernel wants them.
#[derive(Debug)]
pub struct IoBufs<'a> {
    iov: Vec<libc::iovec>,
    len: u64,
    /// False for a host buffer borrowed shared: the buffers may only be written out.
    writable: bool,
    /// The memory the iovecs point into (guest memory, or a host buffer).
    _mem: PhantomData<&'a mut [u8]>,
}

impl<'a> IoBufs<'a> {
    /// The guest buffers `segments` (address, length) of `mem`; a segment that spans two
    /// memory regions becomes two iovecs. Fails when a byte is not guest memory.
    pub fn from_guest(
        mem: &'a GuestMemoryMmap,
        segments: impl IntoIterator<Item = (GuestAddress, u32)>,
    ) -> Result<Self, GuestMemoryError> {
        let mut bufs = IoBufs {
            iov: Vec::new(),
            len: 0,
            writable: true,
            _mem: PhantomData,
        };
        for (addr, len) in segments {
            for slice in mem.get_slices(addr, len as usize) {
                let slice = slice?;
                bufs.iov.push(libc::iovec {
                    iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                    iov_len: slice.len(),
                });
                bufs.len = bufs.len.saturating_add(slice.len() as u64);
            }
        }
        Ok(bufs)
    }

    /// One host buffer to read into (a backend's plain `read_at`).
    pub fn from_slice(buf: &'a mut [u8]) -> Self {
        IoBufs {
            len: buf.len() as u64,
            iov: vec![libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            }],
            writable: true,
            _mem: PhantomData,
        }
    }

    /// One host buffer to write out (a backend's plain `write_at`); reading into it
    /// fails with `EBADF`.
    pub fn from_shared(buf: &'a [u8]) -> Self {
        IoBufs {
            len: buf.len() as u64,
            iov: vec![libc::iovec {
                iov_base: buf.as_ptr().cast_mut().cast(),
                iov_len: buf.len(),
            }],
            writable: false,
            _mem: PhantomData,
        }
    }

    /// Total length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when there is nothing to transfer.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes `[from, to)` of these buffers (clamped to their length), as iovecs.
    pub fn range(&self, from: u64, to: u64) -> IoBufs<'_> {
        let to = to.min(self.len);
        let mut out = IoBufs {
            iov: Vec::new(),
            len: 0,
            writable: self.writable,
            _mem: PhantomData,
        };
        let mut at = 0u64;
        for v in &self.iov {
            let (start, end) = (at, at.saturating_add(v.iov_len as u64));
            at = end;
            let (lo, hi) = (start.max(from), end.min(to));
            if lo >= hi {
                continue;
            }
            out.iov.push(libc::iovec {
                // In bounds: lo - start < iov_len.
                iov_base: v
                    .iov_base
                    .cast::<u8>()
                    .wrapping_add((lo - start) as usize)
                    .cast(),
                iov_len: (hi - lo) as usize,
            });
            out.len += hi - lo;
        }
        out
    }

    /// Reads exactly `self.len()` bytes of `file` at `offset` into the buffers.
    pub fn read_exact_at(&self, file: &File, offset: u64) -> io::Result<()> {
        self.transfer(file, offset, Dir::Read)
    }

    /// Writes all of the buffers to `file` at `offset`.
    pub fn write_all_at(&self, file: &File, offset: u64) -> io::Result<()> {
        self.transfer(file, offset, Dir::Write)
    }

    fn transfer(&self, file: &File, mut offset: u64, dir: Dir) -> io::Result<()> {
        if matches!(dir, Dir::Read) && !self.writable {
            return Err(io::Error::from_raw_os_error(libc::EBADF));
        }
        let mut iov = self.iov.clone();
        let mut first = 0usize;
        while first < iov.len() {
            let batch = iov.get(first..).unwrap_or_default();
            let count = batch.len().min(IOV_MAX);
            let at = libc::off_t::try_from(offset)
                .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
            // SAFETY: every iovec points into memory that is mapped for the lifetime 'a
            // (checked guest memory, or a host buffer borrowed mutably), `count` iovecs
            // are in `batch`, and the fd is open. The kernel reads or writes only there.
            let n = unsafe {
                match dir {
                    Dir::Read => libc::preadv(file.as_raw_fd(), batch.as_ptr(), count as i32, at),
                    Dir::Write => libc::pwritev(file.as_raw_fd(), batch.as_ptr(), count as i32, at),
                }
            };
            let n = match n {
                n if n < 0 => {
                    let e = io::Error::last_os_error();
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(e);
                }
                0 => {
                    return Err(match dir {
                        Dir::Read => io::Error::from(io::ErrorKind::UnexpectedEof),
                        Dir::Write => io::Error::from(io::ErrorKind::WriteZero),
                    })
                }
                n => n as usize,
            };
            offset = offset.saturating_add(n as u64);
            first = advance(&mut iov, first, n);
        }
        Ok(())
    }

    /// Copies `src` into the buffers (in-memory disks), up to the shorter of the two;
    /// nothing for buffers that may only be written out.
    pub fn copy_from(&self, src: &[u8]) {
        if !self.writable {
            return;
        }
        let mut src = src;
        for v in &self.iov {
            let n = v.iov_len.min(src.len());
            let (chunk, rest) = src.split_at(n);
            // SAFETY: the iovec is mapped and writable for 'a (see `transfer`); `chunk` is
            // a host buffer that cannot overlap guest memory handed out as an iovec.
            unsafe { std::ptr::copy_nonoverlapping(chunk.as_ptr(), v.iov_base.cast(), n) };
            src = rest;
        }
    }

    /// Copies the buffers into `dst` (in-memory disks), up to the shorter of the two.
    pub fn copy_to(&self, dst: &mut [u8]) {
        let mut dst = dst;
        for v in &self.iov {
            let n = v.iov_len.min(dst.len());
            let (chunk, rest) = std::mem::take(&mut dst).split_at_mut(n);
            // SAFETY: as in `copy_from`, the other way round.
            unsafe {
                std::ptr::copy_nonoverlapping(v.iov_base.cast::<u8>(), chunk.as_mut_ptr(), n)
            };
            dst = rest;
        }
    }
}

#[derive(Clone, Copy)]
enum Dir {
    Read,
    Write,
}

/// Consumes `n` transferred bytes from `iov[first..]`; returns the new first index.
fn advance(iov: &mut [libc::iovec], mut first: usize, mut n: usize) -> usize {
    while let Some(v) = iov.get_mut(first) {
        if n < v.iov_len {
            v.iov_base = v.iov_base.cast::<u8>().wrapping_add(n).cast();
            v.iov_len -= n;
            break;
        }
        n -= v.iov_len;
        first += 1;
    }
    first
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use vm_memory::Bytes;

    fn two_regions() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000), (GuestAddress(0x1000), 0x1000)])
            .unwrap()
    }

    #[test]
    fn a_segment_across_regions_is_split_and_unmapped_bytes_refused() {
        let mem = two_regions();
        let bufs = IoBufs::from_guest(&mem, [(GuestAddress(0xf00), 0x200)]).unwrap();
        assert_eq!(bufs.len(), 0x200);
        assert_eq!(bufs.iov.len(), 2);
        assert!(IoBufs::from_guest(&mem, [(GuestAddress(0x1f00), 0x200)]).is_err());
    }

    #[test]
    fn vectored_read_and_write_reach_guest_memory() {
        let mem = two_regions();
        let file = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..0x1800u32).map(|i| (i % 251) as u8).collect();
        file.write_all_at(&data, 0).unwrap();
        let segs = [(GuestAddress(0x100), 0x300), (GuestAddress(0xe00), 0x400)];
        let bufs = IoBufs::from_guest(&mem, segs).unwrap();
        bufs.read_exact_at(&file, 0x200).unwrap();
        let mut got = vec![0u8; 0x300];
        mem.read_slice(&mut got, GuestAddress(0x100)).unwrap();
        assert_eq!(got, data[0x200..0x500]);
        let mut got = vec![0u8; 0x400];
        mem.read_slice(&mut got, GuestAddress(0xe00)).unwrap();
        assert_eq!(got, data[0x500..0x900]);

        mem.write_slice(&[7u8; 0x300], GuestAddress(0x100)).unwrap();
        bufs.range(0, 0x300).write_all_at(&file, 0).unwrap();
        let mut back = vec![0u8; 0x300];
        file.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(back, [7u8; 0x300]);
        assert!(
            matches!(bufs.read_exact_at(&file, 0x1700), Err(e) if e.kind() == io::ErrorKind::UnexpectedEof),
            "a read past the end of the file is short"
        );
    }

    #[test]
    fn ranges_cut_across_iovecs() {
        let mut a = [0u8; 10];
        let bufs = IoBufs::from_slice(&mut a);
        let r = bufs.range(3, 7);
        assert_eq!((r.len(), r.iov.len()), (4, 1));
        r.copy_from(&[1, 2, 3, 4]);
        let mut out = [0u8; 4];
        r.copy_to(&mut out);
        assert_eq!(out, [1, 2, 3, 4]);
        assert_eq!(bufs.range(8, 100).len(), 2);
        assert!(bufs.range(12, 20).is_empty());
        drop(bufs);
        assert_eq!(a, [0, 0, 0, 1, 2, 3, 4, 0, 0, 0]);
    }

    #[test]
    fn advance_moves_through_partial_iovecs() {
        let mut buf = [0u8; 8];
        let p = buf.as_mut_ptr().cast();
        let mut iov = [
            libc::iovec {
                iov_base: p,
                iov_len: 3,
            },
            libc::iovec {
                iov_base: p,
                iov_len: 5,
            },
        ];
        assert_eq!(advance(&mut iov, 0, 4), 1);
        assert_eq!(iov[1].iov_len, 4);
        assert_eq!(advance(&mut iov, 1, 4), 2);
    }
}

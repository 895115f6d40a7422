//! Reading a whole BPF hash map (plain or LRU) with `BPF_MAP_LOOKUP_BATCH`: many entries per
//! system call instead of two (next key, then lookup) per entry, which is what aya 0.14 offers.
//!
//! The connection table holds millions of entries; reading it entry by entry costs about two
//! microseconds per entry (a second per half a million), which would hold up the reconcile pass
//! that clears flows of removed backends. Batched, the kernel copies whole hash buckets into
//! the caller's arrays. The iteration follows the buckets, so entries added or removed
//! meanwhile are seen or not, but it never restarts and never repeats a bucket (aya's
//! next-key iteration restarts from the first key when the current one was deleted).
//!
//! `BPF_MAP_LOOKUP_BATCH` exists since Linux 5.6 for hash and LRU hash maps; the `bpf_attr`
//! layout used is the kernel's `batch` member (`include/uapi/linux/bpf.h`).

use std::{
    io,
    marker::PhantomData,
    mem::size_of,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
};

use anyhow::Context as _;
use aya::{
    Pod,
    maps::{HashMap as BpfHashMap, IterableMap as _, MapData},
};

/// `BPF_MAP_LOOKUP_BATCH` (`enum bpf_cmd` in the uapi).
const BPF_MAP_LOOKUP_BATCH: u32 = 24;

/// `BPF_MAP_UPDATE_BATCH` (`enum bpf_cmd` in the uapi).
const BPF_MAP_UPDATE_BATCH: u32 = 26;

/// Entries above which one pass's writes to a map go in one `BPF_MAP_UPDATE_BATCH` call
/// (a cold sync) instead of one call each.
pub const UPDATE_BATCH_MIN: usize = 256;

/// Entries per `BPF_MAP_UPDATE_BATCH` call (as `migrate` writes).
const UPDATE_BATCH_CHUNK: usize = 4096;

/// Entries asked for per call. A hash bucket's entries must fit in one call (the kernel answers
/// `ENOSPC` otherwise, and the chunk is doubled); buckets hold a handful.
const CHUNK: u32 = 4096;

/// The `batch` member of `union bpf_attr` (also used for `BPF_MAP_UPDATE_BATCH`).
#[repr(C)]
#[derive(Default)]
pub(crate) struct BatchAttr {
    /// Where to start: a pointer to the previous call's `out_batch`, or null for the start.
    pub(crate) in_batch: u64,
    /// Where the kernel writes the position to continue from (a `u32` bucket index for hash
    /// maps).
    pub(crate) out_batch: u64,
    /// The keys' buffer.
    pub(crate) keys: u64,
    /// The values' buffer.
    pub(crate) values: u64,
    /// In: room in `keys` / `values`, in entries. Out: entries written.
    pub(crate) count: u32,
    /// The map.
    pub(crate) map_fd: u32,
    /// Per-element flags (`BPF_NOEXIST`, ...).
    pub(crate) elem_flags: u64,
    /// Command flags (none used).
    pub(crate) flags: u64,
}

/// Reads every entry of `map` in chunks (see the module documentation).
#[must_use]
pub fn entries<K: Pod, V: Pod>(map: &BpfHashMap<MapData, K, V>) -> Entries<'_, K, V> {
    Entries {
        fd: map.map().fd().as_fd(),
        position: None,
        done: false,
        chunk: Vec::new(),
        next: 0,
        _kv: PhantomData,
    }
}

/// Iterator returned by [`entries`]: one `Result` per entry; after an error, nothing more.
pub struct Entries<'a, K, V> {
    fd: BorrowedFd<'a>,
    /// The bucket to continue from (`None` before the first call).
    position: Option<u32>,
    /// The kernel said the last call reached the end (or failed).
    done: bool,
    chunk: Vec<(K, V)>,
    next: usize,
    _kv: PhantomData<(K, V)>,
}

impl<K: Pod, V: Pod> Entries<'_, K, V> {
    /// Fetches the next chunk into `self.chunk`.
    fn fetch(&mut self) -> io::Result<()> {
        let mut room = CHUNK;
        loop {
            match lookup_batch::<K, V>(self.fd, self.position, room) {
                Ok(got) => {
                    self.position = got.position;
                    self.done = got.position.is_none();
                    self.chunk = got.entries;
                    self.next = 0;
                    return Ok(());
                }
                // One bucket holds more entries than `room`.
                Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) && room < 1 << 20 => {
                    room *= 2;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl<K: Pod, V: Pod> Iterator for Entries<'_, K, V> {
    type Item = io::Result<(K, V)>;

    fn next(&mut self) -> Option<Self::Item> {
        // Bounded: every fetch either ends the iteration or moves past at least one bucket
        // (the kernel walks a fixed number of buckets); empty chunks are skipped.
        loop {
            if let Some(entry) = self.chunk.get(self.next) {
                self.next += 1;
                return Some(Ok(*entry));
            }
            if self.done {
                return None;
            }
            if let Err(e) = self.fetch() {
                self.done = true;
                self.chunk.clear();
                return Some(Err(e));
            }
        }
    }
}

/// One `BPF_MAP_LOOKUP_BATCH` answer.
struct Batch<K, V> {
    entries: Vec<(K, V)>,
    /// Where to continue; `None` at the end of the map.
    position: Option<u32>,
}

/// One `BPF_MAP_LOOKUP_BATCH` answer, as bytes: `count` entries of the sizes asked for.
pub(crate) struct RawBatch {
    /// `count` keys, back to back.
    pub(crate) keys: Vec<u8>,
    /// `count` values, back to back.
    pub(crate) values: Vec<u8>,
    /// Entries written.
    pub(crate) count: usize,
    /// Where to continue; `None` at the end of the map.
    pub(crate) position: Option<u32>,
}

/// One `BPF_MAP_LOOKUP_BATCH` call for at most `room` entries of a map whose keys and values
/// (per-CPU values: all CPUs' slots) are `key_size` and `value_size` bytes, from `position`.
/// `ENOSPC` (one bucket holds more than `room`) is returned for the caller to grow `room`.
pub(crate) fn lookup_batch_raw(
    fd: BorrowedFd<'_>,
    (key_size, value_size): (usize, usize),
    position: Option<u32>,
    room: u32,
) -> io::Result<RawBatch> {
    let n = room as usize;
    let mut keys = vec![0u8; n * key_size];
    let mut values = vec![0u8; n * value_size];
    let in_batch = position.unwrap_or(0);
    let mut out_batch = 0u32;
    let mut attr = BatchAttr {
        in_batch: if position.is_some() {
            (&raw const in_batch) as u64
        } else {
            0
        },
        out_batch: (&raw mut out_batch) as u64,
        keys: keys.as_mut_ptr() as u64,
        values: values.as_mut_ptr() as u64,
        count: room,
        map_fd: fd.as_raw_fd().cast_unsigned(),
        ..BatchAttr::default()
    };
    // SAFETY: `attr` is the uapi `batch` layout, passed with its exact size (the kernel reads
    // no further and requires nothing beyond it to be zero). Every pointer in it is valid for
    // the call: `keys` and `values` hold `room` entries of the sizes the caller gives, which
    // are the map's (its contract), `in_batch` / `out_batch` are `u32`s, the batch token of
    // hash maps. The kernel writes nothing else.
    let ret = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_bpf,
            BPF_MAP_LOOKUP_BATCH,
            &raw mut attr,
            size_of::<BatchAttr>(),
        )
    };
    let end = if ret == 0 {
        false
    } else {
        let e = io::Error::last_os_error();
        // ENOENT: this call reached the end (and may still have returned entries).
        if e.raw_os_error() != Some(nix::libc::ENOENT) {
            return Err(e);
        }
        true
    };
    Ok(RawBatch {
        keys,
        values,
        count: (attr.count as usize).min(n),
        position: (!end).then_some(out_batch),
    })
}

/// One `BPF_MAP_LOOKUP_BATCH` call for at most `room` entries from `position`, typed (aya
/// checked `K` and `V` against the map's sizes when it was typed as `HashMap<K, V>`).
fn lookup_batch<K: Pod, V: Pod>(
    fd: BorrowedFd<'_>,
    position: Option<u32>,
    room: u32,
) -> io::Result<Batch<K, V>> {
    let raw = lookup_batch_raw(fd, (size_of::<K>(), size_of::<V>()), position, room)?;
    let entries = (0..raw.count)
        .map(|i| {
            // SAFETY: entry `i` lies inside the buffers (`i < count <= room`); `K` and `V` are
            // `Pod`, so any bytes the kernel wrote are a valid value; `read_unaligned` needs no
            // alignment.
            unsafe {
                (
                    raw.keys
                        .as_ptr()
                        .add(i * size_of::<K>())
                        .cast::<K>()
                        .read_unaligned(),
                    raw.values
                        .as_ptr()
                        .add(i * size_of::<V>())
                        .cast::<V>()
                        .read_unaligned(),
                )
            }
        })
        .collect();
    Ok(Batch {
        entries,
        position: raw.position,
    })
}

/// One `BPF_MAP_UPDATE_BATCH` call writing `entries` into `map`, in order (`BPF_ANY`: created
/// or replaced). On an error some entries may have been written (the kernel stops at the first
/// it cannot write) or none (a kernel before 5.6 has no such call); the caller writes them all
/// again one by one (writing an entry twice is harmless).
pub fn update_batch<K: Pod, V: Pod>(
    map: &BpfHashMap<MapData, K, V>,
    entries: &[(K, V)],
) -> io::Result<()> {
    let (keys, values): (Vec<K>, Vec<V>) = entries.iter().copied().unzip();
    let count =
        u32::try_from(entries.len()).map_err(|_| io::Error::from_raw_os_error(nix::libc::E2BIG))?;
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count,
        map_fd: map.map().fd().as_fd().as_raw_fd().cast_unsigned(),
        ..BatchAttr::default()
    };
    // SAFETY: `attr` is the uapi `batch` layout, passed with its exact size. `keys` and
    // `values` hold `count` entries of `K` and `V` back to back (a `Vec` of a `Pod` type has
    // no gap between elements), the map's key and value sizes (aya checked them when the map
    // was typed); the kernel only reads them. It writes only `attr.count`.
    let ret = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_bpf,
            BPF_MAP_UPDATE_BATCH,
            &raw mut attr,
            size_of::<BatchAttr>(),
        )
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Writes `entries` into the hash map `map` (`name` for errors) in order, in batches (see
/// [`write_in_batches`]); each entry's result, in order.
pub fn write_entries<K: Pod, V: Pod>(
    map: &mut BpfHashMap<MapData, K, V>,
    entries: &[(K, V)],
    name: &'static str,
) -> Vec<anyhow::Result<()>> {
    write_in_batches(
        map,
        entries,
        |map, all| update_batch(map, all),
        |map, (k, v)| {
            map.insert(k, v, 0)
                .with_context(|| format!("writing {name}"))
        },
    )
}

/// Writes `entries` in order and returns each one's result, in order. More than
/// [`UPDATE_BATCH_MIN`] go through `batch` first, a chunk of up to 4,096 per call; on any
/// error of a call (a kernel without batch calls, a full map, one bad entry) every entry of
/// its chunk is written again through `one`, one per call, so each gets its own result.
/// `state` is what both write through.
pub fn write_in_batches<S, T>(
    state: &mut S,
    entries: &[T],
    mut batch: impl FnMut(&mut S, &[T]) -> io::Result<()>,
    mut one: impl FnMut(&mut S, &T) -> anyhow::Result<()>,
) -> Vec<anyhow::Result<()>> {
    if entries.len() <= UPDATE_BATCH_MIN {
        return entries.iter().map(|e| one(state, e)).collect();
    }
    let mut out = Vec::with_capacity(entries.len());
    for chunk in entries.chunks(UPDATE_BATCH_CHUNK) {
        match batch(state, chunk) {
            Ok(()) => out.extend(chunk.iter().map(|_| Ok(()))),
            Err(e) => {
                tracing::debug!(
                    entries = chunk.len(),
                    "BPF_MAP_UPDATE_BATCH failed ({e}); writing the entries one by one"
                );
                out.extend(chunk.iter().map(|e| one(state, e)));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the fakes saw: batch calls (their sizes) and single writes (the entries).
    #[derive(Default)]
    struct Seen {
        batches: Vec<usize>,
        ones: Vec<u32>,
    }

    fn entries(n: u32) -> Vec<u32> {
        (0..n).collect()
    }

    /// Writes `list` through fakes that always succeed.
    fn write_all(seen: &mut Seen, list: &[u32]) -> Vec<anyhow::Result<()>> {
        write_in_batches(
            seen,
            list,
            |s, e| {
                s.batches.push(e.len());
                Ok(())
            },
            |s, e| {
                s.ones.push(*e);
                Ok(())
            },
        )
    }

    #[test]
    fn few_entries_are_written_one_by_one() {
        let mut seen = Seen::default();
        let list = entries(UPDATE_BATCH_MIN as u32);
        let results = write_all(&mut seen, &list);
        assert!(seen.batches.is_empty());
        assert_eq!(seen.ones, list);
        assert!(results.iter().all(Result::is_ok));
    }

    #[test]
    fn many_entries_go_in_one_call() {
        let mut seen = Seen::default();
        let list = entries(1000);
        let results = write_all(&mut seen, &list);
        assert_eq!(seen.batches, [1000]);
        assert!(seen.ones.is_empty());
        assert_eq!(results.len(), 1000);
        assert!(results.iter().all(Result::is_ok));
        let mut seen = Seen::default();
        assert_eq!(write_all(&mut seen, &entries(10_000)).len(), 10_000);
        assert_eq!(seen.batches, [4096, 4096, 1808], "in chunks");
    }

    #[test]
    fn a_failed_batch_is_written_again_one_by_one_in_order_each_with_its_result() {
        let mut seen = Seen::default();
        let list = entries(400);
        // The batch stops (a full map, a kernel without the call); alone, entry 300 fails.
        let results = write_in_batches(
            &mut seen,
            &list,
            |s, e| {
                s.batches.push(e.len());
                Err(io::Error::from_raw_os_error(nix::libc::E2BIG))
            },
            |s, e| {
                s.ones.push(*e);
                if *e == 300 {
                    anyhow::bail!("E2BIG")
                }
                Ok(())
            },
        );
        assert_eq!(seen.batches, [400]);
        assert_eq!(seen.ones, list, "every entry, in order");
        let failed: Vec<usize> = (0..400).filter(|i| results[*i].is_err()).collect();
        assert_eq!(failed, [300]);
    }
}

//! Pinned maps whose size differs from what this agent asks for (a restart with another
//! `--max-*` flag, or an object whose fixed-size map grew): migrated, not silently kept.
//!
//! Before the object is loaded, every pinned map of [`MAP_NAMES`] is compared with the map this
//! agent would create (type, key and value size, flags, entries after the `--max-*` flags):
//! - same: adopted as always;
//! - only the number of entries differs: **migrated** (logged as a warning naming the map and
//!   both sizes). Its pin is renamed `<NAME>-old`, the object is loaded (which creates the new
//!   map with the new size at `<NAME>`), every entry is copied from the old map into the new
//!   one (batched reads and writes), the programs are attached (they use the new maps; the old
//!   programs, until replaced, the old ones), then [`Migration::finish`] copies again what the
//!   old programs added in that window (entries the new map does not have: the new programs'
//!   own entries win) and removes the `-old` pins (the kernel frees the old maps when their
//!   last program detaches). Connection tracking, affinity and socket entries come along, so
//!   established connections keep their backends;
//! - anything else (key or value size, type or flags: a layout change without a new layout
//!   version), or a plain hash map asked to shrink below the entries it holds: **refused**
//!   with a message saying what differs, before anything is loaded or pinned.
//!
//! An agent killed in the middle leaves `<NAME>-old` beside `<NAME>`: the next one copies what
//! the new map lacks from it and removes it (or renames it back when the new map was never
//! created). What is lost in the window: counter increments of the old programs after the first
//! copy (statistics only).

use std::{
    collections::BTreeMap,
    fs,
    io::{self, ErrorKind},
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use aya::maps::MapData;
use svc_common::MAP_NAMES;
use tracing::{info, warn};

use crate::{
    datapath::batch::{BatchAttr, lookup_batch_raw},
    loader::MapSizes,
};

/// Suffix of a pin being migrated away from.
const OLD: &str = "-old";

/// `enum bpf_cmd` values (uapi).
const BPF_MAP_UPDATE_ELEM: u32 = 2;
const BPF_MAP_UPDATE_BATCH: u32 = 26;
/// `BPF_NOEXIST` (uapi): add only, never replace.
const BPF_NOEXIST: u64 = 1;

/// `enum bpf_map_type` values (uapi) this module tells apart.
mod map_type {
    #[cfg(test)]
    pub const HASH: u32 = 1;
    pub const ARRAY: u32 = 2;
    pub const PERCPU_HASH: u32 = 5;
    pub const PERCPU_ARRAY: u32 = 6;
    pub const LRU_HASH: u32 = 9;
    pub const LRU_PERCPU_HASH: u32 = 10;
}

/// What defines a map, as far as adopting a pin goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapShape {
    /// `enum bpf_map_type`.
    pub map_type: u32,
    /// Key size in bytes.
    pub key_size: u32,
    /// Value size in bytes.
    pub value_size: u32,
    /// Entries.
    pub max_entries: u32,
    /// `map_flags`.
    pub flags: u32,
}

impl MapShape {
    fn is_array(self) -> bool {
        matches!(self.map_type, map_type::ARRAY | map_type::PERCPU_ARRAY)
    }

    fn is_lru(self) -> bool {
        matches!(
            self.map_type,
            map_type::LRU_HASH | map_type::LRU_PERCPU_HASH
        )
    }

    fn is_per_cpu(self) -> bool {
        matches!(
            self.map_type,
            map_type::PERCPU_HASH | map_type::PERCPU_ARRAY | map_type::LRU_PERCPU_HASH
        )
    }
}

/// What to do with one pinned map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Same shape: adopt it.
    Keep,
    /// Only the size differs: migrate its entries into a new map of the new size.
    Migrate,
    /// Cannot be adopted nor migrated; why.
    Refuse(String),
}

/// Decides what to do with the pinned map `name` of shape `pinned` when this agent wants
/// `wanted`; `entries`: how many entries it holds (needed only for a plain hash map that
/// shrinks).
#[must_use]
pub fn decide(name: &str, pinned: MapShape, wanted: MapShape, entries: usize) -> Decision {
    if pinned == wanted {
        return Decision::Keep;
    }
    let same_layout = MapShape {
        max_entries: wanted.max_entries,
        ..pinned
    } == wanted;
    if !same_layout {
        return Decision::Refuse(format!(
            "the pinned map {name} is {pinned:?}, this agent's layout wants {wanted:?}: a \
             layout change without a new layout version, which this agent cannot convert. \
             `svc-agent cleanup` removes the old state (established connections through \
             services are reset) and lets the agent start afresh"
        ));
    }
    let fits = usize::try_from(wanted.max_entries).is_ok_and(|max| entries <= max);
    if !fits && !pinned.is_lru() && !pinned.is_array() {
        return Decision::Refuse(format!(
            "the pinned map {name} holds {entries} entries, more than the {} asked for now: \
             start with a size of at least {entries} (the flags set {name}'s size; it is now \
             {})",
            wanted.max_entries, pinned.max_entries
        ));
    }
    Decision::Migrate
}

/// The shape of every map of the embedded object with this agent's sizes.
pub fn wanted_shapes(
    object: &[u8],
    sizes: &MapSizes,
) -> anyhow::Result<BTreeMap<String, MapShape>> {
    let obj = aya_obj::Object::parse(object).context("parsing the embedded eBPF object")?;
    let mut out = BTreeMap::new();
    for name in MAP_NAMES {
        let map = obj
            .maps
            .get(*name)
            .with_context(|| format!("no map {name} in the object"))?;
        out.insert(
            (*name).to_owned(),
            MapShape {
                map_type: map.map_type(),
                key_size: map.key_size(),
                value_size: map.value_size(),
                max_entries: sizes
                    .max_entries_of(name)
                    .unwrap_or_else(|| map.max_entries()),
                flags: map.map_flags(),
            },
        );
    }
    Ok(out)
}

fn shape_of(map: &MapData) -> anyhow::Result<MapShape> {
    let info = map.info()?;
    Ok(MapShape {
        map_type: info.map_type()? as u32,
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
        flags: info.map_flags(),
    })
}

/// Maps being migrated: their old maps, kept open until [`Migration::finish`].
#[derive(Debug, Default)]
pub struct Migration {
    old: Vec<(String, PathBuf, MapData, MapShape)>,
}

impl Migration {
    /// Whether no map is being migrated.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.old.is_empty()
    }

    /// Step 1, before the object is loaded: checks every pinned map in `dir` against `wanted`,
    /// refuses (with nothing changed) when one cannot be adopted nor migrated, and moves the
    /// pins of those to migrate to `<NAME>-old`.
    pub fn prepare(dir: &Path, wanted: &BTreeMap<String, MapShape>) -> anyhow::Result<Self> {
        let mut to_move = Vec::new();
        let mut left_over = Vec::new();
        // In MAP_NAMES order, so a refusal names the map its flag is named after
        // (SERVICES_V1 before FRONTEND_NAMES_V1, which is sized with it and never holds more).
        let ordered = MAP_NAMES
            .iter()
            .filter_map(|n| wanted.get_key_value(*n))
            .chain(
                wanted
                    .iter()
                    .filter(|(n, _)| !MAP_NAMES.contains(&n.as_str())),
            );
        for (name, want) in ordered {
            let path = dir.join(name);
            let old_path = old_path(&path);
            let (has_new, has_old) = (exists(&path)?, exists(&old_path)?);
            if has_old && !has_new {
                // Killed before the new map was created: start over.
                fs::rename(&old_path, &path)
                    .with_context(|| format!("renaming {} back", old_path.display()))?;
            } else if has_old {
                // Killed after: the new map is in use; finish copying into it.
                left_over.push((name.clone(), old_path));
            }
            if !exists(&path)? {
                continue;
            }
            let map = MapData::from_pin(&path)
                .with_context(|| format!("opening the pinned map {}", path.display()))?;
            let pinned = shape_of(&map).with_context(|| format!("reading {name}'s info"))?;
            let entries = if pinned.max_entries > want.max_entries
                && !pinned.is_lru()
                && !pinned.is_array()
            {
                read_all(map.fd().as_fd(), pinned)?.len()
            } else {
                0
            };
            match decide(name, pinned, *want, entries) {
                Decision::Keep => {}
                Decision::Migrate => to_move.push((name.clone(), path, map, pinned)),
                Decision::Refuse(why) => bail!("refusing to adopt the pinned maps: {why}"),
            }
        }
        let mut migration = Self::default();
        for (name, old_path) in left_over {
            let map = MapData::from_pin(&old_path)
                .with_context(|| format!("opening {}", old_path.display()))?;
            let shape = shape_of(&map)?;
            warn!(map = %name, "finishing the migration an earlier agent began");
            migration.old.push((name, old_path, map, shape));
        }
        for (name, path, map, pinned) in to_move {
            let want = wanted[&name];
            warn!(
                map = %name,
                pinned_entries = pinned.max_entries,
                wanted_entries = want.max_entries,
                "the pinned map's size differs from this agent's: migrating it into a new map \
                 of the new size (entries, connection tracking included, are copied over)"
            );
            let old_path = old_path(&path);
            fs::rename(&path, &old_path).with_context(|| {
                format!("renaming {} to {}", path.display(), old_path.display())
            })?;
            migration.old.push((name, old_path, map, pinned));
        }
        Ok(migration)
    }

    /// Step 2, once the object is loaded with its new maps pinned in `dir`, before the
    /// programs are attached: copies every entry of each old map into its new map (batched),
    /// replacing what the new map holds.
    pub fn copy(&self, dir: &Path) -> anyhow::Result<()> {
        for (name, _, old, shape) in &self.old {
            let new = MapData::from_pin(dir.join(name))
                .with_context(|| format!("opening the new {name}"))?;
            let entries = read_all(old.fd().as_fd(), *shape)
                .with_context(|| format!("reading the old {name}"))?;
            let new_shape = shape_of(&new)?;
            let copied = write_all(new.fd().as_fd(), new_shape, &entries, false)
                .with_context(|| format!("copying {name}"))?;
            info!(map = %name, entries = copied, to = new_shape.max_entries, "copied into the new map");
        }
        Ok(())
    }

    /// Step 3, once the programs are attached: copies what the old programs added to the old
    /// maps meanwhile (only keys the new maps lack; not for arrays, whose every index exists)
    /// and removes the old pins.
    pub fn finish(self, dir: &Path) -> anyhow::Result<()> {
        for (name, old_path, old, shape) in self.old {
            if !shape.is_array() {
                let new = MapData::from_pin(dir.join(&name))
                    .with_context(|| format!("opening the new {name}"))?;
                let entries = read_all(old.fd().as_fd(), shape)
                    .with_context(|| format!("reading the old {name} again"))?;
                let new_shape = shape_of(&new)?;
                let added = write_all(new.fd().as_fd(), new_shape, &entries, true)
                    .with_context(|| format!("copying {name} again"))?;
                info!(map = %name, added, "copied what the old programs added meanwhile");
            }
            match fs::remove_file(&old_path) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("removing {}", old_path.display()));
                }
            }
            info!(map = %name, "migrated: the old map goes with its last program");
        }
        Ok(())
    }
}

fn old_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(OLD);
    PathBuf::from(p)
}

fn exists(path: &Path) -> anyhow::Result<bool> {
    match fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("stat {}", path.display())),
    }
}

/// Bytes of one value as the syscalls see it: per-CPU maps carry one 8-byte-aligned value per
/// possible CPU.
fn value_bytes(shape: MapShape) -> io::Result<usize> {
    let size = shape.value_size as usize;
    if shape.is_per_cpu() {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        Ok(size.next_multiple_of(8) * cpus)
    } else {
        Ok(size)
    }
}

/// The element member of `union bpf_attr` (`BPF_MAP_UPDATE_ELEM`).
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn bpf<A>(cmd: u32, attr: &mut A) -> io::Result<()> {
    // SAFETY: `attr` is the uapi member for `cmd` with its exact size; the callers make every
    // pointer in it valid for the sizes the map was created with.
    let ret = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            size_of::<A>(),
        )
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// How many entries the hash map `map` holds now, counted with `BPF_MAP_LOOKUP_BATCH` (as a
/// migration reads it; `inspect maps`). Arrays are not walked: every index exists, so they
/// hold their size.
///
/// # Errors
/// When the map's info or a batch cannot be read.
pub fn count_entries(map: &MapData) -> anyhow::Result<usize> {
    let shape = shape_of(map)?;
    if shape.is_array() {
        return Ok(shape.max_entries as usize);
    }
    Ok(read_all(map.fd().as_fd(), shape)?.len())
}

/// Every entry of a map, as (key bytes, value bytes), read with `BPF_MAP_LOOKUP_BATCH`.
/// Bounded: each call moves on by at least one bucket (or ends), and no more entries than the
/// map holds are kept.
fn read_all(fd: BorrowedFd<'_>, shape: MapShape) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let (ks, vs) = (shape.key_size as usize, value_bytes(shape)?);
    let mut out = Vec::new();
    let mut position: Option<u32> = None;
    let mut room: u32 = 1024;
    for _ in 0..=shape.max_entries {
        let got = match lookup_batch_raw(fd, (ks, vs), position, room) {
            Ok(got) => got,
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) && room < 1 << 20 => {
                room *= 2;
                continue;
            }
            Err(e) => return Err(e),
        };
        for i in 0..got.count {
            out.push((
                got.keys[i * ks..(i + 1) * ks].to_vec(),
                got.values[i * vs..(i + 1) * vs].to_vec(),
            ));
        }
        if got.position.is_none() || out.len() >= shape.max_entries as usize {
            return Ok(out);
        }
        position = got.position;
    }
    Ok(out)
}

/// Writes `entries` into a map: all at once with `BPF_MAP_UPDATE_BATCH` (replacing), or, with
/// `only_new`, one by one with `BPF_NOEXIST` (keeping what the map has). Entries whose key does
/// not fit a smaller array are skipped. Returns how many were written.
fn write_all(
    fd: BorrowedFd<'_>,
    shape: MapShape,
    entries: &[(Vec<u8>, Vec<u8>)],
    only_new: bool,
) -> io::Result<usize> {
    let fits = |k: &[u8]| {
        !shape.is_array()
            || k.get(..4)
                .and_then(|b| b.try_into().ok())
                .is_some_and(|b| u32::from_ne_bytes(b) < shape.max_entries)
    };
    let entries: Vec<&(Vec<u8>, Vec<u8>)> = entries.iter().filter(|(k, _)| fits(k)).collect();
    if only_new {
        let mut written = 0;
        for (k, v) in entries {
            let mut attr = ElemAttr {
                map_fd: fd.as_raw_fd().cast_unsigned(),
                key: k.as_ptr() as u64,
                value: v.as_ptr() as u64,
                flags: BPF_NOEXIST,
                ..ElemAttr::default()
            };
            match bpf(BPF_MAP_UPDATE_ELEM, &mut attr) {
                Ok(()) => written += 1,
                Err(e) if e.raw_os_error() == Some(nix::libc::EEXIST) => {}
                Err(e) => return Err(e),
            }
        }
        return Ok(written);
    }
    let mut written = 0;
    for chunk in entries.chunks(4096) {
        let keys: Vec<u8> = chunk.iter().flat_map(|(k, _)| k.iter().copied()).collect();
        let values: Vec<u8> = chunk.iter().flat_map(|(_, v)| v.iter().copied()).collect();
        let count = u32::try_from(chunk.len()).unwrap_or(u32::MAX);
        let mut attr = BatchAttr {
            keys: keys.as_ptr() as u64,
            values: values.as_ptr() as u64,
            count,
            map_fd: fd.as_raw_fd().cast_unsigned(),
            ..BatchAttr::default()
        };
        bpf(BPF_MAP_UPDATE_BATCH, &mut attr)?;
        written += attr.count as usize;
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(map_type: u32, max_entries: u32) -> MapShape {
        MapShape {
            map_type,
            key_size: 4,
            value_size: 20,
            max_entries,
            flags: 0,
        }
    }

    #[test]
    fn same_maps_are_kept_resized_ones_migrated_others_refused() {
        let hash = |n| shape(map_type::HASH, n);
        assert_eq!(decide("BACKENDS_V1", hash(10), hash(10), 5), Decision::Keep);
        assert_eq!(
            decide("BACKENDS_V1", hash(10), hash(20), 5),
            Decision::Migrate
        );
        assert_eq!(
            decide("BACKENDS_V1", hash(20), hash(10), 10),
            Decision::Migrate,
            "shrinking to what it holds"
        );
        let Decision::Refuse(why) = decide("BACKENDS_V1", hash(20), hash(10), 11) else {
            panic!("a plain hash map cannot shrink below its entries");
        };
        assert!(
            why.contains("holds 11 entries, more than the 10 asked for"),
            "{why}"
        );
        let lru = |n| shape(map_type::LRU_HASH, n);
        assert_eq!(
            decide("CT_V1", lru(20), lru(10), 0),
            Decision::Migrate,
            "an LRU map evicts what does not fit"
        );
        let array = |n| shape(map_type::PERCPU_ARRAY, n);
        assert_eq!(
            decide("DROP_STATS_V1", array(20), array(24), 0),
            Decision::Migrate
        );
        let Decision::Refuse(why) = decide(
            "BACKENDS_V1",
            hash(10),
            MapShape {
                value_size: 24,
                ..hash(10)
            },
            0,
        ) else {
            panic!("another value size is another layout");
        };
        assert!(
            why.contains("layout change without a new layout version"),
            "{why}"
        );
        assert!(matches!(
            decide("CT_V1", hash(10), lru(10), 0),
            Decision::Refuse(_)
        ));
    }

    #[test]
    fn old_pins_are_named_with_a_dash() {
        assert_eq!(
            old_path(Path::new("/sys/fs/bpf/svc/v1/CT_V1")),
            Path::new("/sys/fs/bpf/svc/v1/CT_V1-old")
        );
    }
}

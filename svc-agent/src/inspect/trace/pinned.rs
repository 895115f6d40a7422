//! The thin reader of `inspect trace`: [`TraceMaps`] over the pinned maps. The maps only the
//! agent writes and the walk lists (`SERVICES_V1`, `BACKENDS_V1`, the names) are read whole
//! (with batched lookups);
//! the others are looked up one key at a time, as the programs look them up (conntrack and
//! affinity tables can hold millions of entries).

use std::{collections::BTreeMap, path::Path};

use anyhow::Context as _;
use aya::maps::{
    Array, HashMap as BpfHashMap, Map, MapData,
    lpm_trie::{Key as LpmKey, LpmTrie},
};
use svc_common::{
    addrs::{AddrKey, AddrValue},
    affinity::{AffinityKey, AffinityValue},
    conntrack::{CtKey, CtValue},
    maglev::{MaglevChunk, MaglevKey},
    nat::{SnatConfig, SnatValue, config_index},
    ranges::{LOOKUP_BITS, SourceRangeKey, SourceRangeValue},
    service::{Backend, BackendName, ServiceKey, ServiceValue},
};

use super::TraceMaps;
use crate::{
    datapath::{batch, names},
    inspect::open_pinned,
    loader::pin_dir,
    pins,
};

/// The pinned maps `inspect trace` reads (see the module docs).
pub struct PinnedMaps {
    services: BTreeMap<ServiceKey, ServiceValue>,
    backends: BTreeMap<u32, Backend>,
    backend_names: BTreeMap<u32, String>,
    frontend_names: BTreeMap<u32, (String, String)>,
    snat_config: [Option<SnatConfig>; 2],
    socket_programs: bool,
    addrs: BpfHashMap<MapData, AddrKey, AddrValue>,
    ct: BpfHashMap<MapData, CtKey, CtValue>,
    ct_new: Option<BpfHashMap<MapData, CtKey, CtValue>>,
    affinity: Option<BpfHashMap<MapData, AffinityKey, AffinityValue>>,
    maglev: Option<BpfHashMap<MapData, MaglevKey, MaglevChunk>>,
    ranges: Option<LpmTrie<MapData, SourceRangeKey, SourceRangeValue>>,
    snat: Option<BpfHashMap<MapData, CtKey, SnatValue>>,
}

/// A pinned map that an older agent may not have pinned: `None` when absent.
fn optional(bpffs: &Path, name: &str) -> anyhow::Result<Option<MapData>> {
    if pin_dir(bpffs).join(name).exists() {
        open_pinned(bpffs, name).map(Some)
    } else {
        Ok(None)
    }
}

fn hash<K: aya::Pod, V: aya::Pod>(
    data: MapData,
    lru: bool,
    name: &str,
) -> anyhow::Result<BpfHashMap<MapData, K, V>> {
    let map = if lru {
        Map::LruHashMap(data)
    } else {
        Map::HashMap(data)
    };
    BpfHashMap::try_from(map).with_context(|| format!("{name}: not the map this build expects"))
}

/// A hash map [`optional`] pins.
fn optional_hash<K: aya::Pod, V: aya::Pod>(
    bpffs: &Path,
    name: &str,
    lru: bool,
) -> anyhow::Result<Option<BpfHashMap<MapData, K, V>>> {
    optional(bpffs, name)?
        .map(|d| hash(d, lru, name))
        .transpose()
}

impl PinnedMaps {
    /// Opens and reads the pins under `bpffs`.
    ///
    /// # Errors
    /// When a map every layout pins cannot be opened or read.
    pub fn open(bpffs: &Path) -> anyhow::Result<Self> {
        let services: BpfHashMap<MapData, ServiceKey, ServiceValue> =
            hash(open_pinned(bpffs, "SERVICES_V1")?, false, "SERVICES_V1")?;
        let backends: BpfHashMap<MapData, u32, Backend> =
            hash(open_pinned(bpffs, "BACKENDS_V1")?, false, "BACKENDS_V1")?;
        let mut snat_config = [None, None];
        if let Some(data) = optional(bpffs, "SNAT_CONFIG_V1")? {
            let array: Array<MapData, SnatConfig> =
                Array::try_from(Map::Array(data)).context("SNAT_CONFIG_V1")?;
            for (i, family) in [
                (0, svc_common::addr::FAMILY_V4),
                (1, svc_common::addr::FAMILY_V6),
            ] {
                snat_config[i] = array.get(&config_index(family), 0).ok();
            }
        }
        let socket_programs = std::fs::read_dir(pins::links_dir(&pin_dir(bpffs)).join("cgroup"))
            .is_ok_and(|mut d| d.next().is_some());
        Ok(Self {
            services: batch::entries(&services)
                .collect::<Result<_, _>>()
                .context("reading SERVICES_V1")?,
            backends: batch::entries(&backends)
                .collect::<Result<_, _>>()
                .context("reading BACKENDS_V1")?,
            backend_names: crate::inspect::read_names(
                bpffs,
                "BACKEND_NAMES_V1",
                |n: &BackendName| names::display(n),
            )?,
            frontend_names: crate::inspect::read_frontend_names(bpffs)?,
            snat_config,
            socket_programs,
            addrs: hash(open_pinned(bpffs, "ADDRS_V1")?, false, "ADDRS_V1")?,
            ct: hash(open_pinned(bpffs, "CT_V1")?, true, "CT_V1")?,
            ct_new: optional_hash(bpffs, "CT_NEW_V1", true)?,
            affinity: optional_hash(bpffs, "AFFINITY_V1", true)?,
            maglev: optional_hash(bpffs, "MAGLEV_V1", false)?,
            ranges: optional(bpffs, "SOURCE_RANGES_V1")?
                .map(|d| LpmTrie::try_from(Map::LpmTrie(d)).context("SOURCE_RANGES_V1"))
                .transpose()?,
            snat: optional_hash(bpffs, "SNAT_V1", false)?,
        })
    }
}

impl TraceMaps for PinnedMaps {
    fn addr_flags(&self, key: &AddrKey) -> u32 {
        self.addrs.get(key, 0).map_or(0, |v| v.flags)
    }

    fn service(&self, key: &ServiceKey) -> Option<ServiceValue> {
        self.services.get(key).copied()
    }

    fn frontends(&self) -> Vec<(ServiceKey, ServiceValue)> {
        self.services
            .iter()
            .filter(|(k, _)| k.slot == 0)
            .map(|(k, v)| (*k, *v))
            .collect()
    }

    fn backend(&self, id: u32) -> Option<Backend> {
        self.backends.get(&id).copied()
    }

    fn backend_name(&self, id: u32) -> Option<String> {
        self.backend_names.get(&id).cloned()
    }

    fn frontend_name(&self, id: u32) -> Option<(String, String)> {
        self.frontend_names.get(&id).cloned()
    }

    fn ct(&self, unanswered: bool, key: &CtKey) -> Option<CtValue> {
        let map = if unanswered {
            self.ct_new.as_ref()?
        } else {
            &self.ct
        };
        map.get(key, 0).ok()
    }

    fn affinity(&self, key: &AffinityKey) -> Option<AffinityValue> {
        self.affinity.as_ref()?.get(key, 0).ok()
    }

    fn maglev(&self, key: &MaglevKey) -> Option<MaglevChunk> {
        self.maglev.as_ref()?.get(key, 0).ok()
    }

    fn source_range(&self, key: &SourceRangeKey) -> Option<u32> {
        // The kernel's own longest-prefix match, as the program's lookup.
        let key = LpmKey::new(LOOKUP_BITS, *key);
        self.ranges.as_ref()?.get(&key, 0).ok().map(|v| v.verdict)
    }

    fn snat_config(&self, family: u8) -> Option<SnatConfig> {
        self.snat_config[config_index(family) as usize]
    }

    fn snat(&self, key: &CtKey) -> Option<SnatValue> {
        self.snat.as_ref()?.get(key, 0).ok()
    }

    fn socket_programs(&self) -> bool {
        self.socket_programs
    }
}

//! `svc-heap`: where the agent's heap goes at N Services (a benchmark: it prints figures and
//! asserts nothing).
//!
//! Builds the objects of `svc-bench-sync` (`ClusterIP` Services with one TCP port and one
//! `EndpointSlice` of 3 ready endpoints each) and takes them through the agent's own code, the
//! way the API-server source does, measuring the live heap after each stage with a counting
//! allocator:
//!
//! 1. **objects**: parsed from JSON into the `k8s-openapi` types and held as the API-server
//!    source holds them (converted to [`Svc`] and [`Slice`], by namespace and name);
//! 2. **model**: [`Model::replace`] with a snapshot of the stores (per-Service outputs,
//!    ownership index, names, the desired state);
//! 3. **datapath**: [`Reconciler::apply`] of that state into real BPF maps, pinned in a
//!    directory of its own below `/sys/fs/bpf` and removed at the end (the layout, what the
//!    reconciler holds of the maps, address entries).
//!
//! Each stage prints its live bytes and allocations, in all and per Service. Live bytes are
//! what the program asked for; the allocator adds its own overhead per allocation (glibc:
//! 8 bytes, rounded up to 16), shown as an estimate.
//!
//! Knobs: `SVC_HEAP_SERVICES` (default 30,000), `SVC_HEAP_ENDPOINTS` (default 3). Run as
//! root (BPF maps).

use std::{
    alloc::{GlobalAlloc, Layout, System},
    collections::HashMap,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicIsize, Ordering},
    },
};

use anyhow::Context as _;
use k8s_openapi::{
    api::{core::v1::Service, discovery::v1::EndpointSlice},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use svc_agent::{
    datapath::{AyaMaps, Reconciler},
    loader,
    model::{Model, Slice, Snapshot, Svc},
    pins,
};
use svc_tests::bench_objects::{service_json, slice_json};

/// Counts live bytes and allocations on top of the system allocator.
struct Counting;

static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);
static LIVE_ALLOCS: AtomicIsize = AtomicIsize::new(0);

fn signed(n: usize) -> isize {
    isize::try_from(n).unwrap_or(isize::MAX)
}

// SAFETY: every call is forwarded to `System` with the caller's arguments; only counters are
// added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(signed(layout.size()), Ordering::Relaxed);
            LIVE_ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as is.
        unsafe { System.dealloc(ptr, layout) };
        LIVE_BYTES.fetch_sub(signed(layout.size()), Ordering::Relaxed);
        LIVE_ALLOCS.fetch_sub(1, Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded as is.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(signed(new_size) - signed(layout.size()), Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Live bytes and allocations now.
fn live() -> (isize, isize) {
    (
        LIVE_BYTES.load(Ordering::Relaxed),
        LIVE_ALLOCS.load(Ordering::Relaxed),
    )
}

/// Prints what a stage added since `before`, in all and per Service.
#[allow(clippy::cast_precision_loss)]
fn report(stage: &str, before: (isize, isize), services: u32) -> (isize, isize) {
    let now = live();
    let (bytes, allocs) = (now.0 - before.0, now.1 - before.1);
    // glibc: 8 bytes of header per chunk, chunks rounded up to 16 (minimum 32).
    let overhead = allocs * 16;
    let n = f64::from(services);
    println!(
        "{stage:<10} {:>9.1} MiB {:>8.0} B/Service {:>10} allocs {:>6.1}/Service   +~{:.1} MiB allocator overhead",
        bytes as f64 / 1_048_576.0,
        bytes as f64 / n,
        allocs,
        allocs as f64 / n,
        overhead as f64 / 1_048_576.0,
    );
    now
}

/// The key the API-server source's stores use: `namespace/name` in one string.
fn stored_key(meta: &ObjectMeta) -> Box<str> {
    let part = |p: &Option<String>| p.clone().unwrap_or_default();
    format!("{}/{}", part(&meta.namespace), part(&meta.name)).into_boxed_str()
}

fn env_u32(name: &str, default: u32) -> anyhow::Result<u32> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .with_context(|| format!("{name}={v}: not a number")),
        Err(_) => Ok(default),
    }
}

fn main() -> anyhow::Result<()> {
    let services = env_u32("SVC_HEAP_SERVICES", 30_000)?;
    let endpoints = env_u32("SVC_HEAP_ENDPOINTS", 3)?;
    println!("svc-heap: {services} Services, {endpoints} endpoints each");
    let start = live();

    // 1. The objects, as the reflectors hold them.
    let mut service_store = HashMap::new();
    for i in 0..services {
        let svc: Service = serde_json::from_value(service_json(i))?;
        service_store.insert(stored_key(&svc.metadata), Arc::new(Svc::from(svc)));
    }
    let after_services = report("Services", start, services);
    let mut slice_store = HashMap::new();
    for i in 0..services {
        let slice: EndpointSlice = serde_json::from_value(slice_json(i, endpoints, endpoints))?;
        slice_store.insert(stored_key(&slice.metadata), Arc::new(Slice::from(slice)));
    }
    report("slices", after_services, services);
    let after_objects = report("objects", start, services);

    // 2. The model.
    let snapshot = Snapshot {
        services: service_store.values().cloned().collect(),
        slices: slice_store.values().cloned().collect(),
        nodes: Vec::new(),
    };
    let mut model = Model::new("node1");
    model.replace(&snapshot);
    drop(snapshot);
    report("model", after_objects, services);

    // 3. The datapath, into real maps of a directory of their own.
    let bpffs = PathBuf::from(format!("/sys/fs/bpf/svc-heap-{}", std::process::id()));
    std::fs::create_dir_all(bpffs.join("svc"))
        .with_context(|| format!("creating {}", bpffs.display()))?;
    let outcome = (|| {
        let (mut ebpf, _migration) = loader::load_pinned(
            &bpffs,
            loader::MapSizes::default(),
            loader::Globals::default(),
        )?;
        let maps = AyaMaps::take(&mut ebpf)?;
        drop(ebpf);
        let before = live();
        let mut reconciler = Reconciler::adopt(maps)?;
        let report_ = reconciler.apply(model.state());
        anyhow::ensure!(
            report_.errors.is_empty() && report_.skipped.is_empty(),
            "the pass did not program everything: {:?} / {} skipped",
            report_.errors.first(),
            report_.skipped.len()
        );
        drop(report_);
        report("datapath", before, services);
        let total = live();
        println!(
            "{:<10} {:>9.1} MiB in all ({} allocations; model + datapath {:.1} MiB)",
            "total",
            to_mib(total.0 - start.0),
            total.1 - start.1,
            to_mib(total.0 - after_objects.0),
        );
        drop(reconciler);
        Ok(())
    })();
    let removed = pins::remove_tree(&bpffs.join("svc"));
    let _ = std::fs::remove_dir_all(&bpffs);
    outcome?;
    removed?;
    drop((model, service_store, slice_store));
    Ok(())
}

#[allow(clippy::cast_precision_loss)]
fn to_mib(bytes: isize) -> f64 {
    bytes as f64 / 1_048_576.0
}

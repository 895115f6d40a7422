//! The load generator (`svc_tests::loadgen`) through the real kube client against the test API
//! server (tier 1, no root): every write lands as planned, and the server answers controller
//! writes as the real one does (and refuses them unless started writable).

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    sync::{Arc, Mutex},
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    Api,
    api::{DeleteParams, PostParams},
};
use svc_tests::{
    apiserver::{ApiServer, Options},
    loadgen::{self, Condition, Config, Generator, Op, Phase, PoolPod, ServiceSpec},
};

fn pool() -> Vec<PoolPod> {
    (0..6)
        .map(|i| PoolPod {
            ip: IpAddr::V4(Ipv4Addr::new(198, 18, 1 + i % 3, 10 + i)),
            node: format!("node{}", 1 + i % 3),
            name: format!("echo-{i}"),
        })
        .collect()
}

fn config() -> Config {
    let spec = |name: String, host: u8| ServiceSpec {
        name,
        cluster_ip: Some(IpAddr::V4(Ipv4Addr::new(198, 19, 0, host))),
    };
    Config {
        namespace: "bench".into(),
        services: (0..2).map(|i| spec(format!("roll-{i}"), 10 + i)).collect(),
        churn: (0..2)
            .map(|i| spec(format!("churn-{i}"), 200 + i))
            .collect(),
        replicas: 3,
        hpa_step: 2,
        rounds: 2,
        port: 80,
        target_port: 8080,
        rate: 2000.0,
    }
}

/// `(address, ready, serving, terminating)` of every endpoint of a stored slice.
fn endpoints(slice: &EndpointSlice) -> Vec<(String, bool, bool, bool)> {
    slice
        .endpoints
        .iter()
        .map(|e| {
            let c = e.conditions.clone().unwrap_or_default();
            (
                e.addresses[0].clone(),
                c.ready.unwrap_or(false),
                c.serving.unwrap_or(false),
                c.terminating.unwrap_or(false),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_planned_write_lands_through_the_kube_client() -> anyhow::Result<()> {
    let server = Arc::new(
        ApiServer::start_with(Options {
            writable: true,
            ..Options::default()
        })
        .await?,
    );
    let client = server.client()?;
    let (config, pool) = (config(), pool());
    let plan = loadgen::plan(&config, &pool)?;
    let mut generator = Generator::new(&client, &config, &pool)?;
    // After each write the server holds exactly the planned slice (or none).
    let mismatches = Arc::new(Mutex::new(Vec::new()));
    let check = {
        let (server, mismatches, pool) =
            (Arc::clone(&server), Arc::clone(&mismatches), pool.clone());
        move |w: &loadgen::Written| {
            let slices: BTreeMap<String, EndpointSlice> = server
                .objects_of::<EndpointSlice>()
                .unwrap()
                .into_iter()
                .map(|s| (s.metadata.name.clone().unwrap(), s))
                .collect();
            let stored = slices.get(&loadgen::slice_name(&w.service));
            let want = match &w.planned.op {
                Op::CreateSlice(e) | Op::ReplaceSlice(e) => Some(e.clone()),
                Op::DeleteSlice => None,
                _ => return,
            };
            let got = stored.map(endpoints);
            let want = want.map(|e| {
                e.iter()
                    .map(|e| {
                        let (r, s, t) = match e.condition {
                            Condition::NotReady => (false, false, false),
                            Condition::Ready => (true, true, false),
                            Condition::Terminating => (false, true, true),
                        };
                        (pool[e.pod].ip.to_string(), r, s, t)
                    })
                    .collect::<Vec<_>>()
            });
            if got != want {
                mismatches
                    .lock()
                    .unwrap()
                    .push(format!("write {}: stored {got:?}, planned {want:?}", w.seq));
            }
        }
    };
    let setup = plan.iter().take_while(|p| p.phase == Phase::Setup).count();
    let mut written = generator.run(&plan[..setup], 0, check.clone()).await?;
    written.extend(generator.run(&plan[setup..], setup, check).await?);
    assert_eq!(written.len(), plan.len());
    assert!(written.windows(2).all(|w| w[0].acked <= w[1].sent));
    let mismatches = mismatches.lock().unwrap().clone();
    assert!(mismatches.is_empty(), "{mismatches:#?}");
    // At the end: the rolled Services with three ready endpoints each, the churned ones gone.
    let services: Vec<String> = server
        .objects_of::<Service>()?
        .into_iter()
        .filter_map(|s| s.metadata.name)
        .collect();
    assert_eq!(services, ["roll-0", "roll-1"]);
    for slice in server.objects_of::<EndpointSlice>()? {
        let e = endpoints(&slice);
        assert_eq!(e.len(), 3, "{e:?}");
        assert!(e.iter().all(|(_, ready, _, _)| *ready), "{e:?}");
        let annotations = slice.metadata.annotations.unwrap_or_default();
        assert!(annotations.contains_key(loadgen::TRIGGER_TIME));
    }
    // Every write went through the HTTP API (POST, PUT, DELETE), none through a back door.
    let writes = server
        .requests()
        .iter()
        .filter(|r| r.method != "GET")
        .count();
    assert_eq!(writes, plan.len());
    assert_eq!(loadgen::clean_up(&client, "bench").await?, 4);
    assert!(server.objects_of::<Service>()?.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_writes_are_answered_like_the_real_server() -> anyhow::Result<()> {
    let server = ApiServer::start_with(Options {
        writable: true,
        ..Options::default()
    })
    .await?;
    let slices: Api<EndpointSlice> = Api::namespaced(server.client()?, "bench");
    let (config, pool) = (config(), pool());
    let object = |rv: Option<&str>| -> EndpointSlice {
        serde_json::from_value(loadgen::slice_json(&config, "a", &[], &pool, rv)).unwrap()
    };
    let pp = PostParams::default();
    let created = slices.create(&pp, &object(None)).await?;
    let rv = created.metadata.resource_version.clone().unwrap();
    // A second create of the same name: 409 AlreadyExists.
    let err = slices.create(&pp, &object(None)).await.unwrap_err();
    assert!(format!("{err:?}").contains("AlreadyExists"), "{err:?}");
    // Replacing with the current version works; with a stale one: 409 Conflict.
    slices.replace("a-loadgen", &pp, &object(Some(&rv))).await?;
    let err = slices
        .replace("a-loadgen", &pp, &object(Some(&rv)))
        .await
        .unwrap_err();
    assert!(format!("{err:?}").contains("Conflict"), "{err:?}");
    // Without a version: an unconditional update.
    slices.replace("a-loadgen", &pp, &object(None)).await?;
    slices.delete("a-loadgen", &DeleteParams::default()).await?;
    let err = slices
        .delete("a-loadgen", &DeleteParams::default())
        .await
        .unwrap_err();
    assert!(format!("{err:?}").contains("NotFound"), "{err:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_server_refuses_the_generator() -> anyhow::Result<()> {
    let server = ApiServer::start().await?;
    let client = server.client()?;
    let (config, pool) = (config(), pool());
    let plan = loadgen::plan(&config, &pool)?;
    let mut generator = Generator::new(&client, &config, &pool)?;
    let err = generator.run(&plan[..1], 0, |_| {}).await.unwrap_err();
    let text = format!("{err:#}");
    assert!(
        text.contains("write 0 (create slice roll-0, setup)"),
        "{text}"
    );
    assert!(
        text.contains("MethodNotAllowed") || text.contains("405"),
        "{text}"
    );
    assert!(server.objects().is_empty());
    Ok(())
}

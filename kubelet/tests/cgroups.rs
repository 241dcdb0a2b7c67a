//! The kubelet's cgroup hierarchy against the test bed (containerd + runc, cgroupfs): the node
//! allocatable `kubepods` cgroup under the test's own `cgroupRoot` (`/dh-cg-<node>`, see
//! [`Bed`]), the QoS cgroups and each pod's cgroup with its pod-level limits, read back from
//! cgroupfs (v1 controllers on this hybrid host; the v2 files where a controller is in the
//! cgroup2 tree). The container's process is checked to be inside its pod's cgroup.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, ensure};
use deckhand_cgroups::{Manager, convert};
use k8s_openapi::api::core::v1::Pod;
use kube::api::DeleteParams;
use serde_json::json;

mod support;
use support::*;

/// Where `controller`'s files of `cgroup` are, and whether that is a cgroup2 directory.
fn dir_of(cgroup: &str, controller: &str) -> Result<(PathBuf, bool)> {
    let m = Manager::new(cgroup)?;
    if let Some((_, d)) = m
        .v1_dirs()
        .find(|(h, _)| h.controllers.iter().any(|c| c == controller))
    {
        return Ok((d.to_path_buf(), false));
    }
    let l = m.layout();
    match m.unified_dir() {
        Some(d) if l.has_v2(controller) => Ok((d.to_path_buf(), true)),
        _ => Err(anyhow!("no {controller} controller for {cgroup}")),
    }
}

fn read(dir: &std::path::Path, file: &str) -> Result<String> {
    let p = dir.join(file);
    Ok(std::fs::read_to_string(&p)
        .with_context(|| p.display().to_string())?
        .trim()
        .to_string())
}

/// The memory limit in bytes (`None`: unlimited).
fn memory_limit(cgroup: &str) -> Result<Option<u64>> {
    let (d, v2) = dir_of(cgroup, "memory")?;
    let v = read(
        &d,
        if v2 {
            "memory.max"
        } else {
            "memory.limit_in_bytes"
        },
    )?;
    // v1 reports "unlimited" as the largest page-aligned i64.
    Ok(match v.as_str() {
        "max" => None,
        v => Some(v.parse::<u64>()?).filter(|b| *b < (1 << 62)),
    })
}

/// The CFS quota in µs (`None`: no quota).
fn cpu_quota(cgroup: &str) -> Result<Option<i64>> {
    let (d, v2) = dir_of(cgroup, "cpu")?;
    let v = if v2 {
        read(&d, "cpu.max")?
            .split_whitespace()
            .next()
            .unwrap_or("max")
            .to_string()
    } else {
        read(&d, "cpu.cfs_quota_us")?
    };
    Ok(match v.as_str() {
        "max" | "-1" => None,
        v => Some(v.parse()?),
    })
}

/// Whether the cgroup's cpu weight is what `shares` gives (v1 `cpu.shares`, v2 `cpu.weight`).
fn cpu_shares_are(cgroup: &str, shares: u64) -> Result<std::result::Result<(), String>> {
    let (d, v2) = dir_of(cgroup, "cpu")?;
    let (file, want) = if v2 {
        ("cpu.weight", convert::shares_to_weight(shares))
    } else {
        ("cpu.shares", shares)
    };
    let got = read(&d, file)?;
    Ok(if got == want.to_string() {
        Ok(())
    } else {
        Err(format!("{cgroup} {file} is {got}, want {want}"))
    })
}

/// The 2 MB huge page limit in bytes (`None`: unlimited).
fn huge_2mb_limit(cgroup: &str) -> Result<Option<u64>> {
    let (d, v2) = dir_of(cgroup, "hugetlb")?;
    let v = read(
        &d,
        if v2 {
            "hugetlb.2MB.max"
        } else {
            "hugetlb.2MB.limit_in_bytes"
        },
    )?;
    Ok(match v.as_str() {
        "max" => None,
        v => Some(v.parse::<u64>()?).filter(|b| *b < (1 << 62)),
    })
}

fn pids_max(cgroup: &str) -> Result<String> {
    let (d, _) = dir_of(cgroup, "pids")?;
    read(&d, "pids.max")
}

fn sleeper(resources: serde_json::Value) -> serde_json::Value {
    json!({ "name": "main", "image": busybox(), "command": ["sleep", "3600"],
            "resources": resources })
}

async fn running(bed: &Bed, name: &str) -> Result<Pod> {
    bed.wait_pod(name, LONG, "pod Running", |p| {
        if phase(p) == "Running" {
            Ok(p.clone())
        } else {
            Err(format!("status {:?}", p.status))
        }
    })
    .await
}

fn uid(p: &Pod) -> Result<String> {
    p.metadata.uid.clone().ok_or_else(|| anyhow!("no uid"))
}

/// The pids of the container's own cgroup (`<pod cgroup>/<container id>`, as containerd names
/// it with cgroupfs).
fn container_pids(pod_cgroup: &str, container_id: &str) -> Result<Vec<i32>> {
    let (d, _) = dir_of(&format!("{pod_cgroup}/{container_id}"), "memory")?;
    Ok(read(&d, "cgroup.procs")?
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect())
}

async fn gone(cgroup: &str) -> Result<()> {
    eventually(LONG, "pod cgroup removed", || async {
        Ok(if Manager::new(cgroup)?.exists() {
            Err(format!("{cgroup} still exists"))
        } else {
            Ok(())
        })
    })
    .await
}

#[tokio::test]
async fn node_allocatable_qos_and_pod_cgroups() -> Result<()> {
    let bed = Bed::start_config(
        "cg-pods",
        false,
        true,
        "systemReserved: {memory: 100Mi}\nkubeReserved: {memory: 50Mi, cpu: 500m}\n\
         podPidsLimit: 100\n",
    )
    .await?;
    let root = bed.cgroup_root.clone();
    let kubepods = format!("{root}/kubepods");
    let (burstable, besteffort) = (
        format!("{kubepods}/burstable"),
        format!("{kubepods}/besteffort"),
    );

    // Node allocatable enforced: capacity minus the reservations, not the eviction threshold
    // (v1 rounds the limit down to whole pages).
    // The machine as the kubelet reads it.
    let machine = deckhand_kubelet::machine::MachineInfo::collect()?;
    let want = machine.memory_bytes - (150 << 20);
    let limit = eventually(LONG, "kubepods sized", || async {
        Ok(match memory_limit(&kubepods) {
            Ok(Some(l)) => Ok(l),
            other => Err(format!("kubepods memory limit: {other:?}")),
        })
    })
    .await?;
    assert!(
        limit <= want && want - limit < 4096,
        "kubepods memory limit {limit}, want {want}"
    );
    let node_shares = (machine.num_cpus * 1000 - 500) * 1024 / 1000;
    cpu_shares_are(&kubepods, node_shares)?.map_err(|e| anyhow!(e))?;
    cpu_shares_are(&besteffort, 2)?.map_err(|e| anyhow!(e))?;
    // kubepods may use the node's 2 MB pages, the QoS tiers add no limit of their own.
    let pages = machine.huge_pages.iter().find(|h| h.page_size == 2 << 20);
    if let Some(h) = pages {
        assert_eq!(huge_2mb_limit(&kubepods)?, Some(h.page_size * h.count));
        assert_eq!(huge_2mb_limit(&besteffort)?, None);
    }
    cpu_shares_are(&burstable, 2)?.map_err(|e| anyhow!(e))?;

    // A Guaranteed pod: limits summed, quota, pids.max from podPidsLimit.
    bed.create_pod(
        "guaranteed",
        json!({ "containers": [sleeper(json!({"limits": {"cpu": "200m", "memory": "64Mi"}}))] }),
    )
    .await?;
    let g = running(&bed, "guaranteed").await?;
    let g_uid = uid(&g)?;
    let g_cg = format!("{kubepods}/pod{g_uid}");
    assert_eq!(memory_limit(&g_cg)?, Some(64 << 20));
    assert_eq!(cpu_quota(&g_cg)?, Some(20_000));
    cpu_shares_are(&g_cg, 204)?.map_err(|e| anyhow!(e))?;
    assert_eq!(pids_max(&g_cg)?, "100");
    if pages.is_some() {
        assert_eq!(huge_2mb_limit(&g_cg)?, Some(0), "no huge pages requested");
    }

    // The container runs inside the pod cgroup.
    let containers = containers_of(&g_uid).await?;
    let id = &containers
        .first()
        .ok_or_else(|| anyhow!("no container"))?
        .id;
    let pids = container_pids(&g_cg, id)?;
    ensure!(!pids.is_empty(), "no process in {g_cg}/{id}");
    let own = std::fs::read_to_string(format!("/proc/{}/cgroup", pids[0]))?;
    let line = own
        .lines()
        .find(|l| {
            l.split(':')
                .nth(1)
                .is_some_and(|c| c.split(',').any(|c| c == "memory"))
        })
        .ok_or_else(|| anyhow!("no memory line in {own}"))?;
    assert!(
        line.ends_with(&format!("{g_cg}/{id}")),
        "the container's cgroup: {line}"
    );

    // Burstable pods: shares from the requests, no quota or memory limit without limits on
    // every container; the burstable tier's shares follow the pods.
    bed.create_pod(
        "burst-a",
        json!({ "containers": [sleeper(json!({"requests": {"cpu": "300m", "memory": "16Mi"}}))] }),
    )
    .await?;
    bed.create_pod(
        "burst-b",
        json!({ "containers": [
            sleeper(json!({"requests": {"cpu": "100m"}, "limits": {"cpu": "400m", "memory": "32Mi"}})),
        ] }),
    )
    .await?;
    let a = running(&bed, "burst-a").await?;
    let b = running(&bed, "burst-b").await?;
    let a_cg = format!("{burstable}/pod{}", uid(&a)?);
    let b_cg = format!("{burstable}/pod{}", uid(&b)?);
    cpu_shares_are(&a_cg, 307)?.map_err(|e| anyhow!(e))?;
    assert_eq!(cpu_quota(&a_cg)?, None);
    assert_eq!(memory_limit(&a_cg)?, None);
    cpu_shares_are(&b_cg, 102)?.map_err(|e| anyhow!(e))?;
    assert_eq!(cpu_quota(&b_cg)?, Some(40_000));
    assert_eq!(memory_limit(&b_cg)?, Some(32 << 20));
    let burst = burstable.clone();
    eventually(
        Duration::from_secs(10),
        "burstable shares = 400m",
        || async { cpu_shares_are(&burst, 409) },
    )
    .await?;

    // Deleting a pod removes its cgroup and its share of the burstable tier.
    bed.pods()
        .delete("burst-a", &DeleteParams::default())
        .await?;
    gone(&a_cg).await?;
    eventually(LONG, "burstable shares = 100m", || async {
        cpu_shares_are(&burst, 102)
    })
    .await?;

    // A pod that has finished keeps its cgroup until it is deleted, but its requests leave
    // the burstable tier (upstream counts only active pods).
    bed.create_pod(
        "burst-done",
        json!({ "restartPolicy": "Never", "containers": [{
            "name": "main", "image": busybox(), "command": ["true"],
            "resources": {"requests": {"cpu": "200m"}},
        }] }),
    )
    .await?;
    let done = bed
        .wait_pod("burst-done", LONG, "pod Succeeded", |p| {
            if phase(p) == "Succeeded" {
                Ok(p.clone())
            } else {
                Err(format!("status {:?}", p.status))
            }
        })
        .await?;
    let done_cg = format!("{burstable}/pod{}", uid(&done)?);
    eventually(LONG, "burstable shares = 100m again", || async {
        cpu_shares_are(&burst, 102)
    })
    .await?;
    ensure!(
        Manager::new(&done_cg)?.exists(),
        "the finished pod's cgroup is kept until deletion"
    );
    bed.pods()
        .delete("burst-done", &DeleteParams::default())
        .await?;
    gone(&done_cg).await?;
    cpu_shares_are(&burst, 102)?.map_err(|e| anyhow!(e))?;
    bed.pods()
        .delete("guaranteed", &DeleteParams::default())
        .await?;
    gone(&g_cg).await?;
    bed.pass()
}

#[tokio::test]
async fn without_cgroups_per_qos_pods_go_under_the_root() -> Result<()> {
    let bed = Bed::start_config(
        "cg-flat",
        false,
        true,
        "cgroupsPerQOS: false\nenforceNodeAllocatable: []\n",
    )
    .await?;
    let root = bed.cgroup_root.clone();
    bed.create_pod(
        "flat",
        json!({ "containers": [sleeper(json!({"limits": {"cpu": "100m", "memory": "32Mi"}}))] }),
    )
    .await?;
    let p = running(&bed, "flat").await?;
    let containers = containers_of(&uid(&p)?).await?;
    let id = &containers
        .first()
        .ok_or_else(|| anyhow!("no container"))?
        .id;
    let pids = container_pids(&root, id)?;
    ensure!(!pids.is_empty(), "no process in {root}/{id}");
    assert!(
        !Manager::new(&format!("{root}/kubepods"))?.exists(),
        "no kubepods without cgroupsPerQOS"
    );
    // The container's own limit still applies (the runtime sets it).
    assert_eq!(memory_limit(&format!("{root}/{id}"))?, Some(32 << 20));
    bed.pass()
}

/// Pod cgroups without a pod (left by pods deleted while the kubelet was down) are removed once
/// the sources have synced; one that still holds processes is left alone (another kubelet on the
/// same root, or a runtime still running it).
#[tokio::test]
async fn orphaned_pod_cgroups_are_removed() -> Result<()> {
    let bed = Bed::start_config("cg-orphans", false, true, "").await?;
    let kubepods = format!("{}/kubepods", bed.cgroup_root);
    let stale = format!("{kubepods}/besteffort/pod00000000-dead-4000-8000-000000000001");
    let stale_g = format!("{kubepods}/pod00000000-dead-4000-8000-000000000002");
    let busy = format!("{kubepods}/burstable/pod00000000-dead-4000-8000-000000000003");
    // kubepods is made at the kubelet's start.
    eventually(LONG, "kubepods made", || async {
        Ok(if Manager::new(&kubepods)?.exists() {
            Ok(())
        } else {
            Err("no kubepods yet".to_string())
        })
    })
    .await?;
    for c in [&stale, &stale_g, &busy] {
        Manager::new(c)?.create()?;
    }
    let mut sleeper = std::process::Command::new("sleep").arg("600").spawn()?;
    let res = async {
        Manager::new(&busy)?.apply(i32::try_from(sleeper.id())?)?;
        gone(&stale).await?;
        gone(&stale_g).await?;
        ensure!(Manager::new(&busy)?.exists(), "the busy cgroup was removed");
        let procs = Manager::new(&busy)?.procs()?;
        ensure!(
            procs.contains(&i32::try_from(sleeper.id())?),
            "the busy cgroup's process: {procs:?}"
        );
        Ok(())
    }
    .await;
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    let _ = Manager::new(&busy).and_then(|m| m.destroy(true));
    res
}

//! Container lifecycle hooks: postStart right after StartContainer, preStop before
//! StopContainer, as upstream's handler runner.
//!
//! Handlers: exec (CRI `ExecSync`), httpGet (host defaulting to the pod IP; an answer of any
//! status is a success, only a failed request fails, as upstream) and sleep. tcpSocket is
//! deprecated and not a hook upstream runs: it is ignored with a warning. A failed postStart
//! is a `FailedPostStartHook` event and the worker kills the container; a failed preStop is a
//! `FailedPreStopHook` event and the container is stopped anyway. preStop is bounded by the
//! grace period, and StopContainer gets what is left of it (at least
//! [`MIN_GRACE_SECONDS`], as upstream).

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, LifecycleHandler, Pod};

use super::probes::{self, ExecClient, HttpTarget};
use super::spec;
use crate::events::{EventType, Recorder};

/// The least grace StopContainer gets after a preStop hook.
pub const MIN_GRACE_SECONDS: i64 = 2;
/// How long an httpGet hook may take (upstream's hook HTTP client has no shorter bound).
const HTTP_HOOK_TIMEOUT: Duration = Duration::from_secs(60);

/// Which hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// `postStart`.
    PostStart,
    /// `preStop`.
    PreStop,
}

fn handler(c: &Container, hook: Hook) -> Option<&LifecycleHandler> {
    let l = c.lifecycle.as_ref()?;
    match hook {
        Hook::PostStart => l.post_start.as_ref(),
        Hook::PreStop => l.pre_stop.as_ref(),
    }
}

/// Whether `c` has the hook.
pub fn has(c: &Container, hook: Hook) -> bool {
    handler(c, hook).is_some()
}

/// Runs handler `h` of container `c` (runtime ID `id`); the message of a failure names the
/// hook as upstream's (`Exec lifecycle hook ([..]) for Container "c" in Pod "p_ns(uid)"
/// failed - error: .., message: ..`).
pub async fn run_handler(
    exec: &ExecClient,
    pod: &Pod,
    c: &Container,
    id: &str,
    h: &LifecycleHandler,
    pod_ip: &str,
) -> Result<(), String> {
    let (name, ns, uid) = spec::ids(pod);
    let who = format!("for Container {:?} in Pod \"{name}_{ns}({uid})\"", c.name);
    if let Some(e) = &h.exec {
        let cmd = e.command.clone().unwrap_or_default();
        let fail = |error: String, message: &str| {
            format!(
                "Exec lifecycle hook ({cmd:?}) {who} failed - error: {error}, message: {message:?}"
            )
        };
        return match exec.exec(id, &cmd, Duration::ZERO).await {
            Ok(o) if o.exit_code == 0 => Ok(()),
            Ok(o) => Err(fail(
                format!("command {cmd:?} exited with {}", o.exit_code),
                o.output.trim_end(),
            )),
            Err(e) => Err(fail(e, "")),
        };
    }
    if let Some(a) = &h.http_get {
        let path = a.path.clone().unwrap_or_default();
        let fail = |error: String| {
            format!("HTTP lifecycle hook ({path}) {who} failed - error: {error}, message: \"\"")
        };
        let target = HttpTarget::of(a, c, pod_ip).map_err(&fail)?;
        return probes::http_get(&target, HTTP_HOOK_TIMEOUT)
            .await
            .map(|_| ())
            .map_err(fail);
    }
    if let Some(s) = &h.sleep {
        tokio::time::sleep(Duration::from_secs(u64::try_from(s.seconds).unwrap_or(0))).await;
        return Ok(());
    }
    if h.tcp_socket.is_some() {
        tracing::warn!(pod = %spec::full_name(pod), container = %c.name, "tcpSocket lifecycle hooks are deprecated and not run");
        return Ok(());
    }
    Err(format!("lifecycle hook {who} has no handler"))
}

/// Runs `c`'s postStart hook, if any; a failure is recorded as a `FailedPostStartHook` event
/// and returned (the caller kills the container).
pub async fn post_start(
    exec: &ExecClient,
    events: &Recorder,
    pod: &Pod,
    c: &Container,
    id: &str,
    pod_ip: &str,
) -> Result<(), String> {
    let Some(h) = handler(c, Hook::PostStart) else {
        return Ok(());
    };
    let r = run_handler(exec, pod, c, id, h, pod_ip).await;
    if let Err(msg) = &r {
        events.event(
            pod,
            Some(&c.name),
            EventType::Warning,
            "FailedPostStartHook",
            msg.clone(),
        );
    }
    r
}

/// Runs `c`'s preStop hook, if any, within `grace` seconds; returns the grace StopContainer
/// gets (what is left, at least [`MIN_GRACE_SECONDS`]; `grace` itself without a hook).
pub async fn pre_stop(
    exec: &ExecClient,
    events: &Recorder,
    pod: &Pod,
    c: &Container,
    id: &str,
    pod_ip: &str,
    grace: i64,
) -> i64 {
    let Some(h) = handler(c, Hook::PreStop) else {
        return grace;
    };
    let started = Instant::now();
    let limit = Duration::from_secs(u64::try_from(grace).unwrap_or(0));
    tracing::info!(pod = %spec::full_name(pod), container = %c.name, grace, "running the preStop hook");
    match tokio::time::timeout(limit, run_handler(exec, pod, c, id, h, pod_ip)).await {
        Ok(Ok(())) => {}
        Ok(Err(msg)) => events.event(
            pod,
            Some(&c.name),
            EventType::Warning,
            "FailedPreStopHook",
            msg,
        ),
        Err(_) => tracing::info!(
            pod = %spec::full_name(pod),
            container = %c.name,
            "the preStop hook did not complete within the grace period ({grace} s)"
        ),
    }
    remaining(grace, started.elapsed())
}

/// The grace left after `elapsed` of `grace` seconds, at least [`MIN_GRACE_SECONDS`].
pub fn remaining(grace: i64, elapsed: Duration) -> i64 {
    let used = i64::try_from(elapsed.as_secs()).unwrap_or(i64::MAX);
    grace.saturating_sub(used).max(MIN_GRACE_SECONDS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_gets_the_rest_of_the_grace_period() {
        assert_eq!(remaining(30, Duration::from_millis(10_900)), 20);
        assert_eq!(remaining(30, Duration::from_secs(29)), MIN_GRACE_SECONDS);
        assert_eq!(remaining(30, Duration::from_secs(100)), MIN_GRACE_SECONDS);
        assert_eq!(remaining(0, Duration::ZERO), MIN_GRACE_SECONDS);
    }

    fn pod() -> Pod {
        serde_json::from_value(
            serde_json::json!({"metadata": {"name": "p", "namespace": "n",
            "uid": "u"}, "spec": {"containers": [{"name": "c"}]}}),
        )
        .expect("pod")
    }

    #[tokio::test]
    async fn http_hooks_fail_only_when_the_request_fails() {
        let c: Container = serde_json::from_value(serde_json::json!({"name": "c",
            "lifecycle": {"postStart": {"httpGet": {"port": "web", "path": "/x"}}},
            "ports": [{"name": "web", "containerPort": 1}]}))
        .expect("container");
        assert!(has(&c, Hook::PostStart) && !has(&c, Hook::PreStop));
        let exec = ExecClient::new("unix:///nonexistent/dh.sock");
        let events = Recorder::logging();
        // Port 1 on loopback: refused.
        let err = post_start(&exec, &events, &pod(), &c, "id", "127.0.0.1")
            .await
            .expect_err("refused");
        assert!(
            err.starts_with(
                "HTTP lifecycle hook (/x) for Container \"c\" in Pod \"p_n(u)\" failed"
            ),
            "{err}"
        );
        // A container without the hook: nothing runs and the whole grace is left.
        assert_eq!(
            pre_stop(&exec, &events, &pod(), &c, "id", "127.0.0.1", 7).await,
            7
        );
        let tcp: Container = serde_json::from_value(serde_json::json!({"name": "c",
            "lifecycle": {"preStop": {"tcpSocket": {"port": 1}}}}))
        .expect("container");
        assert_eq!(
            pre_stop(&exec, &events, &pod(), &tcp, "id", "127.0.0.1", 7).await,
            7
        );
    }
}

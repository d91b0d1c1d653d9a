//! Template: an agent's sandbox under a declarative egress policy (docs/policy.md).
//!
//! 1. The policy allows PyPI over HTTPS and nothing else: no other name resolves (our resolver
//!    refuses it without asking upstream), no address is reachable unless an allowed name
//!    resolved to it, and the cloud metadata address and the host are never reachable.
//! 2. The sandbox gets a network under that policy; the runtime enforces it on the host, in the
//!    sandbox's own network namespace, where the guest cannot touch it.
//! 3. Inside, one allowed fetch (`https://pypi.org/simple/`) and two denied ones (a name the
//!    policy does not allow, and the metadata address). The guest cannot tell a refusal from a
//!    network failure (a refused name and an unreachable upstream resolver both read "Temporary
//!    failure in name resolution"), so a failed fetch is labelled by what the policy says of it:
//!    "failed, as the policy requires" or "failed (no route to the internet?)".
//! 4. The deny events the host recorded are printed, identical ones counted once (a resolver
//!    retries), and each denied fetch is checked against them: the proof that the policy, not the
//!    network, stopped it. That is what a platform logs or alerts on.
//!
//! Needs root (netns, nftables), the `nft` binary, a `/dev/kvm` that boots Linux, and for the
//! allowed fetch a host that reaches PyPI (the upstream resolver is the host's). Run it with
//! `cargo xtask run --example egress_policy` (in the nested test host on machines without such a
//! KVM; that host has no route to the internet, so the allowed fetch fails there, labelled so,
//! while the denials and events are shown all the same).

use std::time::Duration;

use sandbox_core::{ExecRequest, NetworkSpec, PolicyDocument, RootMode, Sandbox};
use sandbox_kvm::runtime::{KvmRuntime, KvmRuntimeConfig};

/// What the agent may reach. `*.example.org` would allow any deeper name but not the apex;
/// `cidr = "198.51.100.0/24"` rules allow addresses without DNS; `[[deny]]` rules win.
const POLICY: &str = r#"
default = "deny"

[[allow]]
domain = "pypi.org"
ports = [443]
protocol = "tcp"

[[allow]]
domain = "files.pythonhosted.org"
ports = [443]
protocol = "tcp"
"#;

/// A guest-side fetch that prints `ok <status>` or `error <type> <message>`, then how long it took.
fn fetch(url: &str) -> String {
    format!(
        "python3 -c \"import time,urllib.request as u; t=time.time()\ntry:\n r=u.urlopen('{url}', timeout=15); print('ok', r.status, end='')\nexcept Exception as e:\n print('error', type(e).__name__, e, end='')\nprint(' ({{:.1f}} s)'.format(time.time()-t))\""
    )
}

/// What a fetch's outcome means, from the guest's side only. A failed fetch the policy allows is
/// the network's doing (no route to the internet, upstream DNS down); a failed fetch it denies is
/// what the policy requires, and the host's deny events (checked in `main`) show who stopped it.
fn verdict(allowed: bool, guest: &str) -> String {
    match (allowed, guest.strip_prefix("error ")) {
        (true, None) => guest.to_string(),
        (true, Some(why)) => format!("failed (no route to the internet?): {why}"),
        (false, Some(why)) => format!("failed, as the policy requires: {why}"),
        (false, None) => format!("NOT denied: {guest}"),
    }
}

/// The host part of `url` (`https://example.com/x` -> `example.com`).
fn url_host(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.split(['/', ':']).next().unwrap_or(rest)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let runtime = KvmRuntime::new(KvmRuntimeConfig::builder().build()?)?;
    let spec = runtime
        .spec_builder()
        .memory_mib(256)
        .root(RootMode::Writable)
        .network(NetworkSpec::with_policy(PolicyDocument::toml(POLICY)))
        .build()?;
    let sandbox = runtime.create_sandbox(spec).await?;
    let mut events = sandbox
        .egress_events()
        .expect("a sandbox with a policy has a deny-event stream");

    let mut denied_hosts = Vec::new();
    for (what, url, allowed) in [
        ("allowed: PyPI", "https://pypi.org/simple/", true),
        (
            "denied: a name the policy does not allow",
            "https://example.com/",
            false,
        ),
        (
            "denied: the cloud metadata address",
            "http://169.254.169.254/latest/meta-data/",
            false,
        ),
    ] {
        let out = sandbox.exec(ExecRequest::shell(fetch(url))).await?;
        let outcome = verdict(allowed, out.stdout_str().trim());
        println!("{what:45} {url:45} -> {outcome}");
        if !allowed {
            denied_hosts.push(url_host(url));
        }
    }

    println!("\ndeny events recorded on the host (identical ones counted):");
    let mut seen: Vec<(String, usize)> = Vec::new();
    let mut named: Vec<String> = Vec::new();
    while let Ok(Some(event)) = tokio::time::timeout(Duration::from_secs(3), events.recv()).await {
        let line = format!(
            "{} {:?} {}:{} name={} reason={:?}",
            event.sandbox,
            event.protocol,
            event.destination,
            event.port,
            event.name.as_deref().unwrap_or("-"),
            event.reason
        );
        named.push(event.destination.to_string());
        named.extend(event.name.clone());
        match seen.iter_mut().find(|(l, _)| *l == line) {
            Some((_, n)) => *n += 1,
            None => seen.push((line, 1)),
        }
    }
    for (line, n) in &seen {
        let times = if *n > 1 {
            format!(" (x{n})")
        } else {
            String::new()
        };
        println!("  {line}{times}");
    }
    for host in denied_hosts {
        let proof = if named.iter().any(|n| n.trim_end_matches('.') == host) {
            "stopped by the policy (a deny event names it)"
        } else {
            "NO deny event names it: the policy did not stop it"
        };
        println!("{host:45} -> {proof}");
    }
    sandbox.destroy().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{url_host, verdict};

    #[test]
    fn a_failed_allowed_fetch_is_not_called_denied() {
        let dns = "error URLError <urlopen error [Errno -3] Temporary failure in name resolution> \
                   (0.1 s)";
        let allowed = verdict(true, dns);
        assert!(
            allowed.starts_with("failed (no route to the internet?)"),
            "{allowed}"
        );
        assert!(!allowed.contains("denied"), "{allowed}");
        assert!(verdict(false, dns).starts_with("failed, as the policy requires: URLError"));
        assert_eq!(verdict(true, "ok 200 (0.4 s)"), "ok 200 (0.4 s)");
        assert!(verdict(false, "ok 200 (0.4 s)").starts_with("NOT denied"));
    }

    #[test]
    fn hosts_are_cut_out_of_urls() {
        assert_eq!(url_host("https://example.com/"), "example.com");
        assert_eq!(
            url_host("http://169.254.169.254/latest/meta-data/"),
            "169.254.169.254"
        );
        assert_eq!(url_host("http://h:8080/x"), "h");
        assert_eq!(url_host("h"), "h");
    }
}

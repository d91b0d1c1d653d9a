//! A preview of an app an agent built: the agent writes a small web app inside a throwaway
//! micro-VM, starts it, and the platform shows it to a person through a host URL. Copy this into
//! your platform and swap the generated app for your agent's work.
//!
//! 1. Boot a sandbox with a network but **no egress** (`NetworkSpec::deny_egress()`): the app is
//!    reached from the host through an exposed port, and the guest cannot reach anything else,
//!    not the internet, not the host's other services (docs/network.md).
//! 2. The "agent" writes the app with `write_file`: a page it generated and a Python
//!    `http.server` app that serves it and a small JSON endpoint.
//! 3. Start the app in the background (`nohup … &`, output to a log file in the guest) and wait
//!    until it listens on its port inside the guest.
//! 4. `expose(port)` gives the preview URL on the host (`127.0.0.1:<ephemeral>`); fetch the page
//!    and the endpoint through it with a plain HTTP/1.0 GET over `std::net::TcpStream` and print
//!    them. This is where a platform would hand the URL to its UI (or put a reverse proxy with
//!    authentication in front of it: the exposed port itself has none).
//! 5. Destroy the sandbox: the forwarder, the netns, the VMM and every file go with it.
//!
//! Needs root (sandbox networks create a netns and a veth per sandbox), `SANDBOX_KERNEL`,
//! `SANDBOX_ROOTFS` and `SANDBOX_VMM`, and a `/dev/kvm` that boots Linux. Run it with
//! `cargo xtask run --example preview_app` (in the nested test host where the local KVM cannot
//! boot Linux).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use sandbox_core::{ExecRequest, FileOptions, NetworkSpec, RootMode, Sandbox};
use sandbox_kvm::runtime::{KvmRuntime, KvmRuntimeConfig, KvmSandbox};

/// Where the app lives inside the guest.
const APP_DIR: &str = "/srv/preview";
/// The port the app listens on inside the guest (any free port; the host side is ephemeral).
const APP_PORT: u16 = 8000;

/// The page the "agent" generated. A real agent writes whatever it built here.
fn generated_page() -> String {
    let items: String = ["Parse the CSV", "Chart the totals", "Write the summary"]
        .iter()
        .enumerate()
        .map(|(i, t)| format!("      <li>step {}: {t}</li>\n", i + 1))
        .collect();
    format!(
        "<!doctype html>\n<html>\n  <head><title>Agent preview</title></head>\n  <body>\n    \
         <h1>Built in a sandbox</h1>\n    <ul>\n{items}    </ul>\n  </body>\n</html>\n"
    )
}

/// The app: `/` serves the generated page, `/api/status` a JSON document, everything else 404.
/// It binds 0.0.0.0 so that the exposed port (which arrives on the guest's `eth0`) reaches it.
const APP_PY: &str = r#"import http.server, json, os, platform

PAGE = open(os.path.join(os.path.dirname(__file__), "index.html"), "rb").read()

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path in ("/", "/index.html"):
            body, kind = PAGE, "text/html; charset=utf-8"
        elif self.path == "/api/status":
            body = json.dumps({"ok": True, "kernel": platform.release()}).encode()
            kind = "application/json"
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

http.server.ThreadingHTTPServer(("0.0.0.0", int(os.environ["PORT"])), Handler).serve_forever()
"#;

/// One HTTP/1.0 GET to `addr` (the server closes the connection after the response); returns
/// (status line, body). Blocking: call it from `spawn_blocking` in async code.
fn http_get(addr: SocketAddr, path: &str) -> Result<(String, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .with_context(|| format!("connecting to the preview at {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: preview\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let raw = String::from_utf8_lossy(&raw);
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .context("the response has no header end")?;
    let status = head.lines().next().unwrap_or_default().to_string();
    Ok((status, body.to_string()))
}

/// Starts the app in the background and waits until it accepts connections inside the guest.
async fn start_app(sb: &KvmSandbox) -> Result<()> {
    // The `&` and the redirections matter: `exec` returns when the command exits *and* its
    // stdout/stderr are closed, so a background server must not hold them.
    let start =
        format!("cd {APP_DIR} && PORT={APP_PORT} nohup python3 app.py >app.log 2>&1 </dev/null &");
    let out = sb.exec(ExecRequest::shell(start)).await?;
    ensure!(out.status.success(), "starting the app: {out:?}");
    let probe = format!(
        "python3 -c \"import socket; socket.create_connection(('127.0.0.1', {APP_PORT}), 1)\""
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if sb.exec(ExecRequest::shell(&probe)).await?.status.success() {
            return Ok(());
        }
        if Instant::now() > deadline {
            let log = sb
                .exec(ExecRequest::shell(format!("cat {APP_DIR}/app.log")))
                .await?;
            bail!(
                "the app did not listen within 60 s; its log:\n{}",
                log.stdout_str()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    // Finds sandbox-vmm and the guest artifacts via SANDBOX_VMM, SANDBOX_KERNEL, SANDBOX_ROOTFS.
    let runtime = KvmRuntime::new(KvmRuntimeConfig::default()).context(
        "starting the KVM runtime (run it with `cargo xtask run --example preview_app`)",
    )?;

    // 1. A sandbox with a network and no egress: a preview needs inbound only.
    let spec = runtime
        .spec_builder()
        .memory_mib(256)
        .root(RootMode::Writable)
        .network(NetworkSpec::deny_egress())
        .build()?;
    let t = Instant::now();
    let sb = runtime.create_sandbox(spec).await?;
    println!(
        "preview_app: sandbox {} up in {:.1} s",
        sb.id(),
        t.elapsed().as_secs_f64()
    );

    // Everything after create runs in a block so that the sandbox is destroyed on every path.
    let result: Result<()> = async {
        // 2. The agent writes its app.
        let opts = FileOptions::new().create_parents(true);
        sb.write_file(&format!("{APP_DIR}/index.html"), generated_page().as_bytes(), &opts)
            .await?;
        sb.write_file(&format!("{APP_DIR}/app.py"), APP_PY.as_bytes(), &opts)
            .await?;

        // 3. Start it.
        start_app(&sb).await?;

        // 4. The preview URL, and what a person opening it sees.
        let addr = sb.expose(APP_PORT).await?;
        println!("preview_app: preview URL http://{addr}/");
        let (page, status) = tokio::task::spawn_blocking(move || {
            Ok::<_, anyhow::Error>((http_get(addr, "/")?, http_get(addr, "/api/status")?))
        })
        .await??;
        println!("preview_app: GET / → {}\n{}", page.0, page.1);
        println!("preview_app: GET /api/status → {}\n{}", status.0, status.1);
        ensure!(
            page.0.contains(" 200 ") && page.1 == generated_page(),
            "the preview did not serve the generated page"
        );
        ensure!(status.0.contains(" 200 "), "the status endpoint failed");

        // No egress: the app cannot call out (a fetch from the guest fails).
        let out = sb
            .exec(
                ExecRequest::shell(
                    "python3 -c \"import socket; socket.create_connection(('198.51.100.2', 80), 3)\"",
                )
                .timeout(Duration::from_secs(30)),
            )
            .await?;
        ensure!(!out.status.success(), "a deny_egress sandbox reached out");
        println!("preview_app: the guest cannot connect out (deny_egress), as configured");
        Ok(())
    }
    .await;

    // 5. Destroy: the exposed port closes with the sandbox.
    let id = sb.id().clone();
    sb.destroy().await?;
    result?;
    println!("preview_app: sandbox {id} destroyed");
    Ok(())
}

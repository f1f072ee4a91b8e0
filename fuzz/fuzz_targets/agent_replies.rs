//! Fuzzes the shim's client of the guest agent (ttrpc over vsock) against a compromised
//! agent: the shim's calls (Wait, State, Pids, Stats, and kestrel's own ReadVolume call)
//! are in flight, and the agent's side of the connection answers with what the input
//! says, then hangs up. Checked: every call returns — an answer or an error, never a
//! panic or a hang — once the connection is gone.
//!
//! Input, frame after frame (the agent's writes):
//! - `0`: raw bytes (length byte, bytes), written as they are;
//! - `1`: a frame with a fuzzed header (stream, type, flags) and payload;
//! - `2`: a response to one of the calls: a ttrpc `Response` with a fuzzed status code,
//!   message and payload (what the shim decodes as WaitResponse, `Reply`, …).
//!
//! `cargo fuzz run agent_replies` from the repository root.

#![no_main]

use std::sync::OnceLock;

use containerd_shim_protos::api::{PidsRequest, StateRequest, StatsRequest, WaitRequest};
use containerd_shim_protos::protobuf::{EnumOrUnknown, Message};
use containerd_shim_protos::shim_async::TaskClient;
use containerd_shim_protos::ttrpc::asynchronous::transport::Socket;
use containerd_shim_protos::ttrpc::{self, Response, Status};
use kestrel_agent_protocol::Call;
use kestrel_shim::untrusted::call;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// The shim's calls take the odd stream ids from 1, in the order they are sent.
const CALLS: u32 = 5;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime")
    })
}

fn frame(stream: u32, kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(10 + payload.len());
    f.extend((payload.len() as u32).to_be_bytes());
    f.extend(stream.to_be_bytes());
    f.extend([kind, flags]);
    f.extend(payload);
    f
}

/// The agent's writes, from the input.
fn answers(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let take = |n: usize, data: &mut &[u8]| -> Option<Vec<u8>> {
        let (head, rest) = data.split_at_checked(n)?;
        *data = rest;
        Some(head.to_vec())
    };
    while let Some(op) = take(1, &mut data) {
        let Some(len) = take(1, &mut data) else {
            break;
        };
        let len = usize::from(len[0]).min(data.len());
        let Some(body) = take(len, &mut data) else {
            break;
        };
        // Streams 1, 3, …, 9 are the calls; other picks reach ids nobody waits for.
        let stream = u32::from(op[0] >> 2) * 2 + 1;
        match op[0] % 4 {
            0 => out.extend(body),
            1 => {
                let (kind, flags) = (op[0] >> 5, op[0] >> 2 & 7);
                out.extend(frame(stream, kind, flags, &body));
            }
            _ => {
                let (code, rest) = body.split_first().unwrap_or((&0, &[]));
                let (message, payload) = rest.split_at(rest.len().min(usize::from(*code & 15)));
                let mut status = Status::new();
                status.code = EnumOrUnknown::from_i32(i32::from(*code >> 4));
                status.message = String::from_utf8_lossy(message).into_owned();
                let mut res = Response::new();
                res.status = Some(status).into();
                res.payload = payload.to_vec();
                let Ok(bytes) = res.write_to_bytes() else {
                    continue;
                };
                out.extend(frame(stream % (2 * CALLS), 2, 0, &bytes));
            }
        }
    }
    out
}

/// Reads the shim's `CALLS` requests, so every call is registered before the answers come.
async fn read_requests(agent: &mut UnixStream) {
    for _ in 0..CALLS {
        let mut header = [0u8; 10];
        agent
            .read_exact(&mut header)
            .await
            .expect("a request header");
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
        let mut body = vec![0u8; len as usize];
        agent.read_exact(&mut body).await.expect("a request body");
    }
}

fuzz_target!(|data: &[u8]| {
    let writes = answers(data);
    runtime().block_on(async move {
        let (host, mut agent) = UnixStream::pair().expect("a socket pair");
        let raw = ttrpc::asynchronous::Client::new(Socket::new(host));
        let client = TaskClient::new(raw.clone());
        let ctx = || ttrpc::context::with_timeout(0);
        let id = || "c1".to_string();
        let wait_req = WaitRequest {
            id: id(),
            ..Default::default()
        };
        let state_req = StateRequest {
            id: id(),
            ..Default::default()
        };
        let pids_req = PidsRequest {
            id: id(),
            ..Default::default()
        };
        let stats_req = StatsRequest {
            id: id(),
            ..Default::default()
        };
        let read_call = Call::ReadVolume {
            source: "/dev/termination-log".into(),
        };
        let calls = async {
            let wait = client.wait(ctx(), &wait_req);
            let state = client.state(ctx(), &state_req);
            let pids = client.pids(ctx(), &pids_req);
            let stats = client.stats(ctx(), &stats_req);
            let read = call(&raw, &read_call);
            let (w, s, p, st, r) = tokio::join!(wait, state, pids, stats, read);
            if let Ok(w) = w {
                let _ = w.exit_status;
            }
            if let Ok(s) = s {
                let _ = s.status.enum_value_or_default();
            }
            if let Ok(p) = p {
                let _ = p.processes.len();
            }
            if let Ok(st) = st {
                let _ = st.stats.into_option();
            }
            let _ = r;
        };
        let agent_side = async {
            read_requests(&mut agent).await;
            let _ = agent.write_all(&writes).await;
            let _ = agent.shutdown().await;
            drop(agent);
        };
        tokio::join!(calls, agent_side);
    });
});

//! `GET /ws?clientId=…`: connect `status` (with `sid`), reconnect `executing`, feature-flag
//! negotiation on the first client message, and the 0.3.64 unregister-on-exit behaviour.

use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket};
use tokio::sync::mpsc::unbounded_channel;
use tokio_util::sync::CancellationToken;

use super::json::{self, J, jobj};
use super::server::{Inner, SockEntry};

pub(crate) async fn handle(
    inner: Arc<Inner>,
    generation: CancellationToken,
    mut socket: WebSocket,
    client_id: String,
) {
    inner.stat(|s| s.ws_connections += 1);
    let conn = inner.next_conn();
    let kill = generation.child_token();
    inner.sockets().conns.insert(conn, kill.clone());

    if inner.faults.get().silent_websocket {
        inner.stat(|s| s.faults_fired += 1);
        loop {
            tokio::select! {
                () = kill.cancelled() => break,
                m = socket.recv() => match m {
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break,
                    Some(Ok(_)) => {}
                },
            }
        }
        inner.sockets().conns.remove(&conn);
        return;
    }

    let sid = if client_id.is_empty() {
        uuid::Uuid::new_v4().simple().to_string()
    } else {
        client_id
    };
    let (tx, mut rx) = unbounded_channel::<String>();
    {
        // Registration, the connect `status` and the reconnect `executing` are sent directly
        // (not through the bus), like `await self.send(...)` in the handler.
        let st = inner.state();
        let mut socks = inner.sockets();
        socks.map.insert(
            sid.clone(),
            SockEntry {
                conn,
                tx: tx.clone(),
            },
        );
        let status = jobj! {"status" => Inner::queue_info(&st), "sid" => sid.as_str()};
        let _ = tx.send(jobj! {"type" => "status", "data" => status}.to_json());
        if st.client_id.as_deref() == Some(sid.as_str())
            && let Some(node) = &st.last_node_id
        {
            let _ = tx.send(
                jobj! {"type" => "executing", "data" => jobj!{"node" => node.as_str()}}.to_json(),
            );
        }
    }
    let mut first_message = true;
    loop {
        tokio::select! {
            biased;
            () = kill.cancelled() => break,
            out = rx.recv() => match out {
                Some(text) => {
                    if socket.send(Message::Text(text.into())).await.is_err() {
                        break;
                    }
                }
                None => break,
            },
            incoming = socket.recv() => match incoming {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break,
                Some(Ok(Message::Text(t))) => {
                    // json.loads; a decode error or a non-object leaves `first_message` set.
                    if let Ok(J::Obj(data)) = json::parse(t.as_bytes()) {
                        if first_message && data.get("type").and_then(J::as_str) == Some("feature_flags") {
                            let _ = tx.send(jobj! {"type" => "feature_flags", "data" => inner.features()}.to_json());
                        }
                        first_message = false;
                    }
                }
                Some(Ok(_)) => {}
            },
        }
    }
    // `finally: self.sockets.pop(sid, None)` — before the socket is dropped (TCP close).
    {
        let mut socks = inner.sockets();
        let unconditional = inner.faults.get().reconnect_unregisters_new_socket;
        if unconditional || socks.map.get(&sid).is_some_and(|e| e.conn == conn) {
            socks.map.remove(&sid);
        }
        socks.conns.remove(&conn);
    }
    drop(socket);
}

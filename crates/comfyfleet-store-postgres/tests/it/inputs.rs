//! Input files in the database: what one process accepted, every process reads.

use bytes::Bytes;
use comfyfleet_core::{InputStore, StoreError};

use crate::common::{drop_schemas, fresh_schema, store_in};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_input_put_by_one_store_is_read_by_another() {
    let schema = fresh_schema();
    let a = store_in(&schema).await;
    let b = store_in(&schema).await;
    let png = Bytes::from_static(b"\x89PNG\r\n\x1a\n fake image bytes");
    let up = a.put("cat.png", png.clone()).await.unwrap();
    assert_eq!(up.name, "cat.png");
    assert_eq!(up.size, png.len() as u64);
    assert_eq!(up.sha256, comfyfleet_core::inputs::sha256_hex(&png));
    assert_eq!(b.get(&up.sha256).await.unwrap(), Some(png.clone()));
    // The same bytes under another name: stored once, same hash.
    let again = b.put("same.png", png.clone()).await.unwrap();
    assert_eq!(again.sha256, up.sha256);
    // Unknown or malformed hashes are simply absent.
    assert_eq!(a.get(&"0".repeat(64)).await.unwrap(), None);
    assert_eq!(a.get("../../etc/passwd").await.unwrap(), None);
    // A name with a path is refused before anything is stored.
    match a.put("../x.png", png).await {
        Err(StoreError::InvalidInput(msg)) => assert!(msg.contains("plain file name"), "{msg}"),
        other => panic!("expected InvalidInput, got {other:?}"),
    }
    a.close().await;
    b.close().await;
    drop_schemas(&[schema]).await;
}

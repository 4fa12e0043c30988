//! Benches live in `benches/`; see `cargo bench -p comfyfleet-benches`.

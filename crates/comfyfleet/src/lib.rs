//! comfyfleet facade (being written).

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = ipc_mesh_fuzz::request(data);
});

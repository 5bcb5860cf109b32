#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    imgfs::nbd::fuzz_session(data);
});

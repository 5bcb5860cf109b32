#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    imgfs::fuzzing::exercise_luks(data);
});

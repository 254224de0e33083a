//! `--device` names: parsed, and a backend not compiled in is named with the feature to enable.
#[test]
fn devices_parse_and_uncompiled_backends_are_named() {
    use lora_runtime::DeviceSpec;
    assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
    assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
    assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
    assert_eq!("tch-cuda:1".parse::<DeviceSpec>().unwrap(), DeviceSpec::TchCuda(1));
    assert!("gpu".parse::<DeviceSpec>().unwrap_err().to_string().contains("`gpu`"));
    assert!("cuda:x".parse::<DeviceSpec>().unwrap_err().to_string().contains("`x`"));
    let msg = DeviceSpec::TchCpu.not_compiled().to_string();
    assert!(msg.contains("tch-cpu") && msg.contains("--features tch"), "{msg}");
}

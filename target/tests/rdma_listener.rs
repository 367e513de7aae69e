//! A `[[listener]] transport = "rdma"` in a binary built without the `rdma` cargo feature is
//! refused at start with a message naming the feature. With the feature, on a machine without an
//! RDMA device, start fails with a message naming the address and how to make a device
//! (Soft-RoCE); where a device exists, the listener comes up (the lab checks it with Linux's
//! nvme-rdma host).

#[test]
fn an_rdma_listener_without_its_feature_or_device_is_refused_with_a_clear_reason() {
    let text = nvmetro_conf::DEFAULT_CONFIG.replace("address = \"127.0.0.1:4420\"", "address = \"127.0.0.1:0\"\ntransport = \"rdma\"");
    let config = nvmetro_conf::parse(&text, "rdma.toml").expect("the config parses");
    assert_eq!(config.listeners[0].transport, nvmetro_conf::Transport::Rdma);
    match nvmetro_tgt::start(config, None) {
        Err(e) if !cfg!(feature = "rdma") => assert!(e.to_string().contains("`rdma` cargo feature"), "{e}"),
        Err(e) => {
            let e = format!("{e:#}");
            assert!(e.contains("127.0.0.1:0") && e.contains("rdma link add"), "{e}");
        }
        Ok(running) => {
            running.stop();
            #[cfg(not(feature = "rdma"))]
            panic!("a binary without the rdma feature started an rdma listener");
            #[cfg(feature = "rdma")]
            assert!(nvmetro_ffi::rdma::Device::list().is_ok_and(|d| !d.is_empty()), "started without an RDMA device");
        }
    }
}

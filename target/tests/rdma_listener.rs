//! A `[[listener]] transport = "rdma"` is refused at start with a message naming what is missing:
//! the `rdma` cargo feature in a binary built without it, else that RDMA queue pairs are not
//! served yet. Nothing is bound either way.

#[test]
fn an_rdma_listener_is_refused_with_a_clear_reason() {
    let text = nvmetro_conf::DEFAULT_CONFIG.replace("address = \"127.0.0.1:4420\"", "address = \"127.0.0.1:0\"\ntransport = \"rdma\"");
    let config = nvmetro_conf::parse(&text, "rdma.toml").expect("the config parses");
    assert_eq!(config.listeners[0].transport, nvmetro_conf::Transport::Rdma);
    let err = nvmetro_tgt::start(config, None).err().expect("start refuses an rdma listener").to_string();
    if cfg!(feature = "rdma") {
        assert!(err.contains("NVMe/RDMA connections are not served yet"), "{err}");
    } else {
        assert!(err.contains("`rdma` cargo feature"), "{err}");
    }
}

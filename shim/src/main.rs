//! `containerd-shim-kestrel-v2`: containerd's runtime `io.containerd.kestrel.v2` (the
//! pieces are in the `kestrel_shim` library).

#[tokio::main]
async fn main() {
    let config = containerd_shim::Config {
        // The VM runs in this process: there are no child processes to reap.
        no_reaper: true,
        // Our own logger writes each line at once (`logger`); installed by `Service::new`.
        no_setup_logger: true,
        ..Default::default()
    };
    containerd_shim::asynchronous::run::<kestrel_shim::service::Service>(
        "io.containerd.kestrel.v2",
        Some(config),
    )
    .await;
}

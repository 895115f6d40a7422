//! The svc-agent binary.

fn main() -> anyhow::Result<()> {
    let ebpf = svc_agent::loader::load_object()?;
    for (name, _) in ebpf.programs() {
        println!("{name}");
    }
    Ok(())
}

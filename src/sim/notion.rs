//! Placeholder: the Notion simulator is being written (replace this file).

/// Options of the simulator.
#[derive(Debug, Clone, clap::Args)]
pub struct NotionSimArgs {}

/// Runs the simulator on stdio.
pub async fn run(_args: NotionSimArgs) -> anyhow::Result<()> {
    anyhow::bail!("the Notion simulator is not built yet")
}

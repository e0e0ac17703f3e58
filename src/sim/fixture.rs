//! Placeholder until the fixture server lands.

/// Options of the fixture server.
#[derive(Debug, Clone, clap::Args)]
pub struct FixtureArgs {}

/// Runs the fixture server on stdio.
pub async fn run(_args: FixtureArgs) -> anyhow::Result<()> {
    anyhow::bail!("the fixture server is not built yet")
}

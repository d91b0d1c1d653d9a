//! Examples of the sandbox SDK; each `[[example]]` of this package is a template to copy.
//!
//! - `agent_task`: the main job (`cargo xtask demo`): a migration, its tests and an agent's
//!   destructive mistakes in a throwaway micro-VM, next to the host's untouched copy.
//! - `quickstart`: create → exec → write_file/read_file → destroy; the README shows it verbatim.

#[cfg(test)]
mod tests {
    #[test]
    fn the_readme_shows_the_quickstart_example_verbatim() {
        let readme = include_str!("../README.md");
        let example = include_str!("quickstart.rs");
        assert!(
            readme.contains(example),
            "README.md must contain examples/quickstart.rs verbatim; update the README"
        );
    }
}

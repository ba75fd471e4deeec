//! The README's examples are real: the demo and statistics excerpts are the
//! SQL goldens' output (extension/tests/pg_regress/expected/demo.out and
//! stats.out, which `make test` compares with fresh runs).

use pg_fence_tests::repository_root;

fn trimmed(text: &str) -> String {
    text.lines()
        .map(str::trim_end)
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_readme_demo_excerpt_is_the_goldens_output() {
    excerpt_is_the_goldens_output("demo.out");
}

#[test]
fn the_readme_statistics_excerpt_is_the_goldens_output() {
    excerpt_is_the_goldens_output("stats.out");
}

fn excerpt_is_the_goldens_output(golden_name: &str) {
    let root = repository_root();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let golden = std::fs::read_to_string(
        root.join("extension/tests/pg_regress/expected")
            .join(golden_name),
    )
    .unwrap();
    let marker =
        format!("checks it against `extension/tests/pg_regress/expected/{golden_name}`):\n\n```\n");
    let start = readme.find(&marker).expect("the README's block") + marker.len();
    let end = start + readme[start..].find("```").expect("the end of the block");
    let excerpt = trimmed(&readme[start..end]);
    assert!(
        excerpt.lines().count() > 10,
        "the excerpt is too short to mean anything"
    );
    assert!(
        trimmed(&golden).contains(&excerpt),
        "the README's {golden_name} excerpt is not what the golden prints:\n{excerpt}"
    );
}

#[test]
fn the_readme_semaphore_excerpt_is_the_goldens_output() {
    excerpt_is_the_goldens_output("semaphore.out");
}

#[test]
fn the_readme_multi_key_excerpt_is_the_goldens_output() {
    excerpt_is_the_goldens_output("multi.out");
}

#[test]
fn the_readme_shared_lease_excerpt_is_the_goldens_output() {
    excerpt_is_the_goldens_output("shared.out");
}

#[test]
fn the_readme_python_excerpt_is_the_examples_output() {
    let root = repository_root();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let output = std::fs::read_to_string(root.join("examples/python/leases.out")).unwrap();
    let marker = "checks it against `examples/python/leases.out`):\n\n```\n";
    let start = readme.find(marker).expect("the README's block") + marker.len();
    let end = start + readme[start..].find("```").expect("the end of the block");
    assert_eq!(trimmed(&readme[start..end]), trimmed(&output));
}

#[test]
fn the_readme_term_history_excerpt_is_the_goldens_output() {
    excerpt_is_the_goldens_output("history.out");
}

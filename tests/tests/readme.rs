//! The README's examples are real: the demo excerpt is the SQL golden's
//! output (extension/tests/pg_regress/expected/demo.out, which `make test`
//! compares with a fresh run of scripts/demo.sql).

use pg_fence_tests::repository_root;

fn trimmed(text: &str) -> String {
    text.lines()
        .map(str::trim_end)
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_readme_demo_excerpt_is_the_goldens_output() {
    let root = repository_root();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let golden =
        std::fs::read_to_string(root.join("extension/tests/pg_regress/expected/demo.out")).unwrap();
    let marker = "checks it against `extension/tests/pg_regress/expected/demo.out`):\n\n```\n";
    let start = readme.find(marker).expect("the README's demo block") + marker.len();
    let end = start + readme[start..].find("```").expect("the end of the block");
    let excerpt = trimmed(&readme[start..end]);
    assert!(
        excerpt.lines().count() > 10,
        "the excerpt is too short to mean anything"
    );
    assert!(
        trimmed(&golden).contains(&excerpt),
        "the README's demo output is not what the demo prints:\n{excerpt}"
    );
}

//! The recipe JSON Schema is generated from the serde structs and committed; starter
//! recipes from `kiln recipe new` validate.

use kiln_tests::*;

const SCHEMA: &str = "schemas/recipe.schema.json";

#[test]
fn committed_schema_is_the_generated_one() {
    let out = run(&["recipe", "schema"]);
    assert_ok(&out);
    let committed = std::fs::read_to_string(repo_root().join(SCHEMA)).unwrap();
    assert!(
        stdout(&out) == committed,
        "{SCHEMA} is stale: regenerate it with `kiln recipe schema --out {SCHEMA}` and commit it"
    );
}

/// The schema node a key leads to, following `$ref`s into `definitions`.
fn resolve<'a>(
    root: &'a serde_json::Value,
    mut node: &'a serde_json::Value,
) -> &'a serde_json::Value {
    loop {
        if let Some(r) = node.get("$ref").and_then(|r| r.as_str()) {
            let name = r.rsplit('/').next().unwrap();
            node = &root["definitions"][name];
            continue;
        }
        // A described reference: `allOf: [{$ref}]`.
        if let Some([only]) = node
            .get("allOf")
            .and_then(|a| a.as_array())
            .map(Vec::as_slice)
        {
            node = only;
            continue;
        }
        // `Option<T>`: `anyOf: [T, null]`.
        if let Some(any) = node.get("anyOf").and_then(|a| a.as_array())
            && let Some(first) = any.iter().find(|v| v.get("type") != Some(&"null".into()))
        {
            node = first;
            continue;
        }
        return node;
    }
}

/// Every key of `value` is a property of `node`; returns the keys that are not.
fn unknown_keys(
    root: &serde_json::Value,
    node: &serde_json::Value,
    value: &toml::Value,
    at: &str,
) -> Vec<String> {
    let node = resolve(root, node);
    let mut bad = Vec::new();
    match value {
        toml::Value::Table(t) => {
            let props = node.get("properties");
            let free = node
                .get("additionalProperties")
                .is_some_and(|a| a.is_object());
            for (k, v) in t {
                let path = format!("{at}{k}");
                match props.and_then(|p| p.get(k)) {
                    Some(child) => bad.extend(unknown_keys(root, child, v, &format!("{path}."))),
                    None if free => {}
                    None => bad.push(path),
                }
            }
        }
        toml::Value::Array(items) => {
            if let Some(item) = node.get("items") {
                for (i, v) in items.iter().enumerate() {
                    bad.extend(unknown_keys(root, item, v, &format!("{at}[{i}].")));
                }
            }
        }
        _ => {}
    }
    bad
}

#[test]
fn the_schema_knows_every_key_of_every_shipped_recipe() {
    let root: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo_root().join(SCHEMA)).unwrap()).unwrap();
    assert_eq!(root["$schema"], "http://json-schema.org/draft-07/schema#");
    // Descriptions come from the doc comments.
    assert!(
        root["definitions"]["TrainSection"]["properties"]["clip_norm"]["description"]
            .as_str()
            .is_some_and(|d| d.contains("Clip"))
    );
    let mut checked = 0;
    for dir in [
        "recipes/smoke",
        "recipes/bench",
        "recipes/convergent",
        "recipes/discoverlm",
        "recipes/convgpt",
    ] {
        for entry in std::fs::read_dir(repo_root().join(dir)).unwrap() {
            let path = entry.unwrap().path();
            let value: toml::Value =
                toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            let bad = unknown_keys(&root, &root, &value, "");
            assert!(
                bad.is_empty(),
                "{}: keys missing from the schema: {bad:?}",
                path.display()
            );
            checked += 1;
        }
    }
    assert!(checked >= 10);
    // And a typo is not a property.
    let typo: toml::Value = toml::from_str("[optim]\nlearning_rate = 1e-3\n").unwrap();
    assert_eq!(
        unknown_keys(&root, &root, &typo, ""),
        ["optim.learning_rate"]
    );
}

#[test]
fn recipe_new_writes_starters_that_validate() {
    let dir = tempfile::tempdir().unwrap();
    for family in ["qwen2", "qlora", "moa", "convgpt"] {
        let path = dir.path().join(format!("my-{family}.toml"));
        let out = run(&[
            "recipe",
            "new",
            "--family",
            family,
            "--out",
            path.to_str().unwrap(),
        ]);
        assert_ok(&out);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains(&format!("kiln recipe new --family {family}")),
            "{text}"
        );
        // The schema line leads to kiln's schema from wherever the file is.
        let schema = text
            .lines()
            .next()
            .unwrap()
            .strip_prefix("#:schema ")
            .expect("schema line");
        assert!(path.parent().unwrap().join(schema).is_file(), "{schema}");
        let inspect = run(&["inspect", path.to_str().unwrap()]);
        assert_ok(&inspect);
        assert!(
            stdout(&inspect).contains(&format!("my-{family} -> runs/my-{family}")),
            "{}",
            stdout(&inspect)
        );
    }
    let path = dir.path().join("my-moa.toml");
    let again = run(&[
        "recipe",
        "new",
        "--family",
        "moa",
        "--out",
        path.to_str().unwrap(),
    ]);
    assert_eq!(again.status.code(), Some(1));
    assert!(stderr(&again).contains("--force"), "{}", stderr(&again));
    assert_ok(&run(&[
        "recipe",
        "new",
        "--family",
        "qwen2",
        "--out",
        path.to_str().unwrap(),
        "--force",
    ]));
    let bad = run(&["recipe", "new", "--family", "llama"]);
    assert_eq!(bad.status.code(), Some(2));
}

//! No Docker engine runs where the tests run, so the deployment files are
//! checked by reading them: docker-compose.yml parses, has every service,
//! and its commands and environment are accepted by the binary itself.

use std::collections::BTreeMap;
use std::process::Command;

use image_queue_pipeline::StageName;
use yaml_rust2::{Yaml, YamlLoader};

fn compose() -> Yaml {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docker-compose.yml")).unwrap();
    YamlLoader::load_from_str(&text)
        .expect("docker-compose.yml parses")
        .remove(0)
}

/// A service with YAML merge keys (`<<: *anchor`) applied.
fn service(doc: &Yaml, name: &str) -> BTreeMap<String, Yaml> {
    let svc = &doc["services"][name];
    assert!(!svc.is_badvalue(), "service {name} missing");
    let mut out = BTreeMap::new();
    if let Some(base) = svc["<<"].as_hash() {
        for (k, v) in base {
            out.insert(k.as_str().unwrap().to_string(), v.clone());
        }
    }
    for (k, v) in svc.as_hash().unwrap() {
        let k = k.as_str().unwrap();
        if k != "<<" {
            out.insert(k.to_string(), v.clone());
        }
    }
    out
}

fn strings(y: &Yaml) -> Vec<String> {
    y.as_vec()
        .map(|v| {
            v.iter()
                .map(|s| s.as_str().map(String::from).unwrap_or_else(|| format!("{s:?}")))
                .collect()
        })
        .unwrap_or_default()
}

fn env_of(svc: &BTreeMap<String, Yaml>) -> Vec<(String, String)> {
    svc.get("environment")
        .and_then(|e| e.as_hash())
        .map(|h| {
            h.iter()
                .map(|(k, v)| {
                    let v = match v {
                        Yaml::String(s) => s.clone(),
                        Yaml::Integer(i) => i.to_string(),
                        Yaml::Boolean(b) => b.to_string(),
                        other => panic!("unexpected env value {other:?}"),
                    };
                    (k.as_str().unwrap().to_string(), v)
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn compose_has_redis_with_aof_and_noeviction_and_healthchecks() {
    let doc = compose();
    let redis = service(&doc, "redis");
    let cmd = strings(&redis["command"]).join(" ");
    assert!(cmd.contains("--appendonly yes"), "{cmd}");
    assert!(cmd.contains("--maxmemory-policy noeviction"), "{cmd}");
    for name in ["redis", "mariadb", "rembg-0", "rembg-1", "rembg-2", "api"] {
        let svc = service(&doc, name);
        assert!(svc.contains_key("healthcheck"), "{name} has no healthcheck");
    }
    for i in 0..3 {
        let rembg = service(&doc, &format!("rembg-{i}"));
        assert_eq!(rembg["image"].as_str(), Some("danielgatis/rembg:latest"));
    }
    let api = service(&doc, "api");
    assert_eq!(strings(&api["ports"]), vec!["3001:3001"]);
}

#[test]
fn every_stage_has_a_service_whose_command_and_environment_the_binary_accepts() {
    let doc = compose();
    let bin = env!("CARGO_BIN_EXE_image-queue");
    for stage in StageName::ALL {
        let svc = service(&doc, stage.as_str());
        let args = strings(&svc["command"]);
        assert_eq!(&args[..3], ["worker", "--stage", stage.as_str()], "{stage}");
        // The flags parse...
        let help = Command::new(bin).args(&args).arg("--help").output().unwrap();
        assert!(
            help.status.success(),
            "{stage}: {}",
            String::from_utf8_lossy(&help.stderr)
        );
        // ...and the environment is a valid configuration.
        let out = Command::new(bin)
            .arg("config")
            .env_clear()
            .envs(env_of(&svc))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{stage}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("data_dir = \"/data\""), "{text}");
        if stage == StageName::BgRemoval {
            // The rembg pool over the three rembg services.
            let config: toml::Table = text.parse().unwrap();
            let bg = &config["bg_removal"];
            assert_eq!(bg["engine"].as_str(), Some("rembg"), "{text}");
            let urls: Vec<&str> = bg["urls"]
                .as_array()
                .unwrap()
                .iter()
                .map(|u| u.as_str().unwrap())
                .collect();
            assert_eq!(
                urls,
                ["http://rembg-0:7000", "http://rembg-1:7000", "http://rembg-2:7000"]
            );
            for i in 0..3 {
                assert!(doc["services"][format!("rembg-{i}").as_str()].as_hash().is_some());
            }
        }
    }
    for name in ["api", "migrate"] {
        let svc = service(&doc, name);
        let help = Command::new(bin)
            .args(strings(&svc["command"]))
            .arg("--help")
            .output()
            .unwrap();
        assert!(help.status.success(), "{name}");
    }
}

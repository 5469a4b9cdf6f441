//! No Docker engine runs where the tests run, so the deployment files are
//! checked by reading them: docker-compose.yml parses, has every service,
//! and its commands and environment are accepted by the binary itself; the
//! Kubernetes manifests have a Deployment the binary accepts and a KEDA
//! ScaledObject on the right stream and group for every stage.

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

/// Every document of every YAML file under deploy/kubernetes.
fn kubernetes() -> Vec<Yaml> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/kubernetes");
    let mut docs = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("deploy/kubernetes exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty());
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let parsed = YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        docs.extend(parsed.into_iter().filter(|d| !d.is_null()));
    }
    docs
}

fn find<'a>(docs: &'a [Yaml], kind: &str, name: &str) -> &'a Yaml {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {kind} {name} in deploy/kubernetes"))
}

/// The binary accepts a container's args (`--help` appended) and its
/// ConfigMap environment.
fn check_container(docs: &[Yaml], deployment: &Yaml) -> Vec<String> {
    let bin = env!("CARGO_BIN_EXE_image-queue");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let args = strings(&container["args"]);
    let help = Command::new(bin).args(&args).arg("--help").output().unwrap();
    assert!(
        help.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&help.stderr)
    );
    let cm_name = container["envFrom"][0]["configMapRef"]["name"].as_str().unwrap();
    let cm = find(docs, "ConfigMap", cm_name);
    let env: Vec<(String, String)> = cm["data"]
        .as_hash()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.as_str().unwrap().to_string(), v.as_str().unwrap().to_string()))
        .collect();
    let out = Command::new(bin).arg("config").env_clear().envs(env).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    args
}

#[test]
fn webhooks_are_delivered_in_both_deployments() {
    let doc = compose();
    let svc = service(&doc, "webhooks");
    assert_eq!(strings(&svc["command"]), ["webhooks"]);
    let docs = kubernetes();
    let deployment = find(&docs, "Deployment", "image-queue-webhooks");
    assert_eq!(check_container(&docs, deployment), ["webhooks"]);
}

#[test]
fn kubernetes_has_a_deployment_and_a_lag_scaled_object_per_stage() {
    let docs = kubernetes();
    let keys = image_queue_pipeline::Keys::new("iq");
    for stage in StageName::ALL {
        let name = format!("image-queue-{stage}");
        let deployment = find(&docs, "Deployment", &name);
        let args = check_container(&docs, deployment);
        assert_eq!(&args[..3], ["worker", "--stage", stage.as_str()], "{stage}");
        let grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
            .as_i64()
            .unwrap();
        assert!(grace > 25, "{stage}: the grace period must outlast the runner's 25 s");

        let so = find(&docs, "ScaledObject", &name);
        assert_eq!(so["spec"]["scaleTargetRef"]["name"].as_str(), Some(name.as_str()));
        let (min, max) = (
            so["spec"]["minReplicaCount"].as_i64().unwrap(),
            so["spec"]["maxReplicaCount"].as_i64().unwrap(),
        );
        assert!(1 <= min && min <= max, "{stage}: {min}..{max}");
        let trigger = &so["spec"]["triggers"][0];
        assert_eq!(trigger["type"].as_str(), Some("redis-streams"), "{stage}");
        let meta = &trigger["metadata"];
        assert_eq!(meta["stream"].as_str(), Some(keys.stream(stage).as_str()), "{stage}");
        assert_eq!(meta["consumerGroup"].as_str(), Some(keys.group(stage)), "{stage}");
        let lag: u64 = meta["lagCount"].as_str().unwrap().parse().unwrap();
        assert!(lag > 0, "{stage}");
        if stage == StageName::BgRemoval {
            // Three rembg instances, two requests each at once, and each
            // pod's --concurrency: no more pods than the pool can serve.
            let per_pod: i64 = args[args.iter().position(|a| a == "--concurrency").unwrap() + 1]
                .parse()
                .unwrap();
            assert!(
                max * per_pod <= 3 * 2,
                "bg-removal may outgrow the rembg pool: {max} × {per_pod}"
            );
        }
    }
    let api = find(&docs, "Deployment", "image-queue-api");
    let args = check_container(&docs, api);
    assert_eq!(args[0], "api");
    find(&docs, "Service", "image-queue-api");
}

/// docker-compose.ha.yml, the Redis high-availability overlay: a replica,
/// three Sentinels, and every image-queue service given the Sentinels' URL
/// and a replica to wait for, in a configuration the binary accepts.
#[test]
fn the_ha_overlay_runs_sentinels_and_points_every_service_at_them() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docker-compose.ha.yml")).unwrap();
    let ha = YamlLoader::load_from_str(&text)
        .expect("docker-compose.ha.yml parses")
        .remove(0);
    let base = compose();
    let replica = strings(&ha["services"]["redis-replica"]["command"]).join(" ");
    assert!(replica.contains("--replicaof redis 6379"), "{replica}");
    assert!(replica.contains("--appendonly yes"), "{replica}");
    let primary = strings(&ha["services"]["redis"]["command"]).join(" ");
    assert!(primary.contains("--min-replicas-to-write 1"), "{primary}");
    for i in 0..3 {
        let sentinel = &ha["services"][format!("sentinel-{i}").as_str()];
        let script = strings(&sentinel["command"]).join(" ");
        assert!(script.contains("sentinel monitor iq-primary redis 6379 2"), "{script}");
        assert!(script.contains("--sentinel"), "{script}");
        assert!(sentinel["healthcheck"].as_hash().is_some());
    }
    let bin = env!("CARGO_BIN_EXE_image-queue");
    let mut names: Vec<String> = StageName::ALL.iter().map(|s| s.as_str().to_string()).collect();
    names.extend(["api", "migrate", "webhooks"].map(String::from));
    for name in names {
        let overlay = &ha["services"][name.as_str()]["environment"];
        let overlay = overlay
            .as_hash()
            .unwrap_or_else(|| panic!("{name} has no overlay environment"));
        let mut env: BTreeMap<String, String> = env_of(&service(&base, &name)).into_iter().collect();
        for (k, v) in overlay {
            env.insert(k.as_str().unwrap().into(), v.as_str().unwrap().into());
        }
        let url = &env["REDIS_URL"];
        match image_queue_pipeline::Endpoint::parse(url) {
            Ok(image_queue_pipeline::Endpoint::Sentinel(s)) => {
                assert_eq!(s.sentinels.len(), 3, "{url}");
                assert_eq!(s.service, "iq-primary");
            }
            other => panic!("{name}: {url} is not a Sentinel URL: {other:?}"),
        }
        let out = Command::new(bin).arg("config").env_clear().envs(&env).output().unwrap();
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("min_replicas = 1"), "{name}: {text}");
    }
}

//! Configuration validation (issue "Containers and the mesh", item 5): every
//! Envoy configuration the project ships or generates passes `envoy --mode
//! validate` on every installed Envoy version — which loads and configures
//! the real `mcp_filter.wasm` — and every Kubernetes manifest in
//! `envoy/istio/` parses, names known kinds, and matches a schema written
//! from the Istio API (istio/api `extensions/v1alpha1/wasm.proto`,
//! `networking/v1alpha3/envoy_filter.proto`, `virtual_service.proto`), plus
//! the references between the manifests and the filter's own configuration
//! parser. No network is used.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use mcp_gateway_tests::envoy::{render, repo_root, wasm_path};
use mcp_gateway_tests::scratch::fresh_dir;
use serde_yaml::{Mapping, Value};

// ---------------------------------------------------------------- Envoy

/// Envoy versions installed under `.tools/` (scripts/install-deps.sh).
fn installed_envoys() -> Vec<(String, PathBuf)> {
    let mut found: Vec<(String, PathBuf)> = std::fs::read_dir(repo_root().join(".tools"))
        .map(|d| d.flatten().collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let version = name.strip_prefix("envoy-")?.to_string();
            let bin = e.path().join("bin/envoy");
            bin.exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    let wanted = std::env::var("ENVOY_VERSION").unwrap_or_else(|_| "1.40.0".into());
    assert!(found.iter().any(|(v, _)| *v == wanted), "Envoy {wanted} is not installed under .tools/ (run scripts/install-deps.sh); found {found:?}");
    found
}

/// `envoy --mode validate`: (passed, output).
fn validate(bin: &Path, name: &str, yaml: &str) -> (bool, String) {
    let path = fresh_dir("validate").join(format!("{name}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    let out = Command::new(bin).arg("--mode").arg("validate").arg("-c").arg(&path).args(["-l", "warning"]).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success() && text.contains("OK"), text)
}

fn dummy_plugin_config() -> String {
    r#"{"snapshot_secret":"validate-only-not-a-secret-0123456789","hosts":["infrabox.example.com"]}"#.to_string()
}

/// The template with every `{{NAME}}` filled with a dummy value of its kind,
/// as tests and `make run` fill it (tests/src/envoy.rs).
fn rendered_template(plugin_config: &str) -> String {
    let template = std::fs::read_to_string(repo_root().join("envoy/envoy.yaml.tmpl")).unwrap();
    let mut vars: BTreeMap<&str, String> = BTreeMap::new();
    let mut port = 20000u16;
    let mut rest = template.as_str();
    while let Some(i) = rest.find("{{") {
        let end = rest[i..].find("}}").expect("closed placeholder") + i;
        let name = &rest[i + 2..end];
        let value = match name {
            "NODE_ID" => "validate".to_string(),
            "PLUGIN_CONFIG" => plugin_config.to_string(),
            "WASM_PATH" => wasm_path().display().to_string(),
            n if n.ends_with("_PORT") => {
                port += 1;
                port.to_string()
            }
            n if n.ends_with("_HOST") => "127.0.0.1".to_string(),
            n if n.ends_with("_HEALTH_STATUS") => "UNKNOWN".to_string(),
            "GRPC_SECRET" => "validate-only-not-a-secret-grpc".to_string(),
            "XFF_TRUSTED_HOPS" => "0".to_string(),
            other => panic!("envoy/envoy.yaml.tmpl has a placeholder {other} this validation does not know: add it here"),
        };
        vars.insert(name, value);
        rest = &rest[end + 2..];
    }
    render(&template, &vars).unwrap()
}

#[test]
fn the_envoy_template_validates_on_every_installed_envoy() {
    assert!(wasm_path().exists(), "{} is missing: run `make wasm`", wasm_path().display());
    let config = rendered_template(&dummy_plugin_config());
    for (version, bin) in installed_envoys() {
        let (ok, out) = validate(&bin, &format!("template-{version}"), &config);
        assert!(ok, "envoy/envoy.yaml.tmpl does not validate on Envoy {version}:\n{out}");
    }
}

#[test]
fn validate_mode_loads_the_filter_and_rejects_its_bad_configuration() {
    // The evidence that `--mode validate` runs the module: a plugin
    // configuration the filter refuses (secret too short) fails validation.
    let (_, bin) = installed_envoys().pop().unwrap();
    let (ok, out) = validate(&bin, "bad-plugin-config", &rendered_template(r#"{"snapshot_secret":"short","hosts":["a"]}"#));
    assert!(!ok, "a configuration the filter refuses passed validation:\n{out}");
    assert!(out.contains("mcp_gateway"), "{out}");
}

// ------------------------------------------------------------- manifests

/// Every YAML document in `envoy/istio/`, with its file name.
fn manifests() -> Vec<(String, Value)> {
    let dir = repo_root().join("envoy/istio");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.path()).collect();
    files.sort();
    let mut docs = Vec::new();
    for f in files.iter().filter(|f| f.extension().is_some_and(|e| e == "yaml" || e == "yml")) {
        let text = std::fs::read_to_string(f).unwrap();
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v = Value::deserialize(doc).unwrap_or_else(|e| panic!("{name} does not parse: {e}"));
            if !v.is_null() {
                docs.push((name.clone(), v));
            }
        }
    }
    assert!(docs.len() >= 10, "expected the Istio manifests in {}", dir.display());
    docs
}

use serde::Deserialize;

fn get<'a>(v: &'a Value, path: &str) -> &'a Value {
    path.split('.').fold(v, |v, k| v.get(k).unwrap_or(&Value::Null))
}

fn s<'a>(v: &'a Value, path: &str) -> &'a str {
    get(v, path).as_str().unwrap_or("")
}

/// The kinds the manifests may use, by apiVersion.
const KNOWN_KINDS: &[(&str, &str)] = &[
    ("v1", "Namespace"),
    ("v1", "ServiceAccount"),
    ("v1", "ConfigMap"),
    ("v1", "Service"),
    ("apps/v1", "Deployment"),
    ("policy/v1", "PodDisruptionBudget"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
    ("extensions.istio.io/v1alpha1", "WasmPlugin"),
    ("networking.istio.io/v1alpha3", "EnvoyFilter"),
    ("networking.istio.io/v1", "VirtualService"),
    ("networking.istio.io/v1beta1", "VirtualService"),
    ("networking.istio.io/v1", "DestinationRule"),
    ("security.istio.io/v1", "PeerAuthentication"),
    ("security.istio.io/v1", "AuthorizationPolicy"),
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"),
];

/// A schema of Istio resource specs, written from the istio/api protos
/// (field names as the CRDs spell them). Node keys: `type` (object, array,
/// string, integer, boolean, map, struct = any object), `properties`,
/// `required`, `items`, `values`, `enum`, `ref`, `exactly_one_of`,
/// `at_most_one_of`, `url_schemes`, `hex_len`. Objects reject fields the
/// schema does not name: a misspelt field is silently pruned by the CRD.
const ISTIO_SCHEMA: &str = r#"
definitions:
  labels: { type: map, values: { type: string } }
  WorkloadSelector: { type: object, properties: { matchLabels: { ref: labels } } }
  PolicyTargetReference:
    type: object
    required: [kind, name]
    properties: { group: { type: string }, kind: { type: string }, name: { type: string }, namespace: { type: string } }
  StringMatch:
    type: object
    exactly_one_of: [exact, prefix, regex]
    properties: { exact: { type: string }, prefix: { type: string }, regex: { type: string } }
  Destination:
    type: object
    required: [host]
    properties:
      host: { type: string }
      subset: { type: string }
      port: { type: object, properties: { number: { type: integer } } }
  Headers: { type: struct }
  ClientTLS:
    type: object
    properties:
      mode: { enum: [DISABLE, SIMPLE, MUTUAL, ISTIO_MUTUAL] }
      clientCertificate: { type: string }
      privateKey: { type: string }
      caCertificates: { type: string }
      credentialName: { type: string }
      subjectAltNames: { type: array, items: { type: string } }
      sni: { type: string }
      insecureSkipVerify: { type: boolean }
  ConnectionPool:
    type: object
    properties:
      tcp:
        type: object
        properties:
          maxConnections: { type: integer }
          connectTimeout: { type: string }
          tcpKeepalive: { type: struct }
          maxConnectionDuration: { type: string }
          idleTimeout: { type: string }
      http: { type: struct }
  OutlierDetection:
    type: object
    properties:
      splitExternalLocalOriginErrors: { type: boolean }
      consecutiveLocalOriginFailures: { type: integer }
      consecutiveGatewayErrors: { type: integer }
      consecutive5xxErrors: { type: integer }
      interval: { type: string }
      baseEjectionTime: { type: string }
      maxEjectionPercent: { type: integer }
      minHealthPercent: { type: integer }
WasmPlugin:
  type: object
  required: [url]
  at_most_one_of: [selector, targetRef, targetRefs]
  properties:
    selector: { ref: WorkloadSelector }
    targetRef: { ref: PolicyTargetReference }
    targetRefs: { type: array, items: { ref: PolicyTargetReference } }
    url: { type: string, url_schemes: [oci, file, http, https] }
    sha256: { type: string, hex_len: 64 }
    imagePullPolicy: { enum: [UNSPECIFIED_POLICY, IfNotPresent, Always] }
    imagePullSecret: { type: string }
    verificationKey: { type: string }
    pluginConfig: { type: struct }
    pluginName: { type: string }
    phase: { enum: [UNSPECIFIED_PHASE, AUTHN, AUTHZ, STATS] }
    priority: { type: integer }
    failStrategy: { enum: [FAIL_CLOSE, FAIL_OPEN, FAIL_RELOAD] }
    vmConfig:
      type: object
      properties:
        env:
          type: array
          items:
            type: object
            required: [name]
            properties: { name: { type: string }, valueFrom: { enum: [INLINE, HOST] }, value: { type: string } }
    match:
      type: array
      items:
        type: object
        properties:
          mode: { enum: [UNDEFINED, CLIENT, SERVER, CLIENT_AND_SERVER] }
          ports: { type: array, items: { type: object, required: [number], properties: { number: { type: integer } } } }
    type: { enum: [UNSPECIFIED_PLUGIN_TYPE, HTTP, NETWORK] }
EnvoyFilter:
  type: object
  at_most_one_of: [workloadSelector, targetRefs]
  properties:
    workloadSelector: { type: object, properties: { labels: { ref: labels } } }
    targetRefs: { type: array, items: { ref: PolicyTargetReference } }
    priority: { type: integer }
    configPatches:
      type: array
      items:
        type: object
        required: [applyTo, patch]
        properties:
          applyTo:
            enum: [INVALID, LISTENER, FILTER_CHAIN, NETWORK_FILTER, HTTP_FILTER, ROUTE_CONFIGURATION, VIRTUAL_HOST,
                   HTTP_ROUTE, CLUSTER, EXTENSION_CONFIG, BOOTSTRAP, LISTENER_FILTER]
          match:
            type: object
            at_most_one_of: [listener, routeConfiguration, cluster, waypoint]
            properties:
              context: { enum: [ANY, SIDECAR_INBOUND, SIDECAR_OUTBOUND, GATEWAY, WAYPOINT] }
              proxy: { type: object, properties: { proxyVersion: { type: string }, metadata: { ref: labels } } }
              listener:
                type: object
                properties:
                  portNumber: { type: integer }
                  portName: { type: string }
                  name: { type: string }
                  listenerFilter: { type: string }
                  filterChain:
                    type: object
                    properties:
                      name: { type: string }
                      sni: { type: string }
                      transportProtocol: { type: string }
                      applicationProtocols: { type: string }
                      destinationPort: { type: integer }
                      filter:
                        type: object
                        properties:
                          name: { type: string }
                          subFilter: { type: object, properties: { name: { type: string } } }
              routeConfiguration:
                type: object
                properties:
                  portNumber: { type: integer }
                  portName: { type: string }
                  gateway: { type: string }
                  name: { type: string }
                  vhost:
                    type: object
                    properties:
                      name: { type: string }
                      domainName: { type: string }
                      route: { type: object, properties: { name: { type: string }, action: { enum: [ANY, ROUTE, REDIRECT, DIRECT_RESPONSE] } } }
              cluster:
                type: object
                properties: { portNumber: { type: integer }, service: { type: string }, subset: { type: string }, name: { type: string } }
              waypoint: { type: struct }
          patch:
            type: object
            required: [operation]
            properties:
              operation: { enum: [INVALID, MERGE, ADD, REMOVE, INSERT_BEFORE, INSERT_AFTER, INSERT_FIRST, REPLACE, MERGE_AND_REPLACE_LIST] }
              value: { type: struct }
              filterClass: { enum: [UNSPECIFIED, AUTHN, AUTHZ, STATS] }
PeerAuthentication:
  type: object
  properties:
    selector: { ref: WorkloadSelector }
    mtls: { type: object, properties: { mode: { enum: [UNSET, DISABLE, PERMISSIVE, STRICT] } } }
    portLevelMtls: { type: map, values: { type: object, properties: { mode: { enum: [UNSET, DISABLE, PERMISSIVE, STRICT] } } } }
DestinationRule:
  type: object
  required: [host]
  properties:
    host: { type: string }
    exportTo: { type: array, items: { type: string } }
    workloadSelector: { ref: WorkloadSelector }
    subsets: { type: array, items: { type: struct } }
    trafficPolicy:
      type: object
      properties:
        loadBalancer: { type: struct }
        connectionPool: { ref: ConnectionPool }
        outlierDetection: { ref: OutlierDetection }
        tls: { ref: ClientTLS }
        tunnel: { type: struct }
        proxyProtocol: { type: struct }
        portLevelSettings:
          type: array
          items:
            type: object
            properties:
              port: { type: object, properties: { number: { type: integer } } }
              loadBalancer: { type: struct }
              connectionPool: { ref: ConnectionPool }
              outlierDetection: { ref: OutlierDetection }
              tls: { ref: ClientTLS }
AuthorizationPolicy:
  type: object
  at_most_one_of: [selector, targetRef, targetRefs]
  properties:
    selector: { ref: WorkloadSelector }
    targetRef: { ref: PolicyTargetReference }
    targetRefs: { type: array, items: { ref: PolicyTargetReference } }
    action: { enum: [ALLOW, DENY, AUDIT, CUSTOM] }
    provider: { type: struct }
    rules:
      type: array
      items:
        type: object
        properties:
          from:
            type: array
            items:
              type: object
              properties:
                source:
                  type: object
                  properties:
                    principals: { type: array, items: { type: string } }
                    notPrincipals: { type: array, items: { type: string } }
                    requestPrincipals: { type: array, items: { type: string } }
                    namespaces: { type: array, items: { type: string } }
                    ipBlocks: { type: array, items: { type: string } }
                    remoteIpBlocks: { type: array, items: { type: string } }
          to:
            type: array
            items:
              type: object
              properties:
                operation:
                  type: object
                  properties:
                    hosts: { type: array, items: { type: string } }
                    ports: { type: array, items: { type: string } }
                    methods: { type: array, items: { type: string } }
                    paths: { type: array, items: { type: string } }
                    notPorts: { type: array, items: { type: string } }
                    notPaths: { type: array, items: { type: string } }
          when: { type: array, items: { type: struct } }
VirtualService:
  type: object
  properties:
    hosts: { type: array, items: { type: string } }
    gateways: { type: array, items: { type: string } }
    exportTo: { type: array, items: { type: string } }
    tls: { type: array, items: { type: struct } }
    tcp: { type: array, items: { type: struct } }
    http:
      type: array
      items:
        type: object
        properties:
          name: { type: string }
          match:
            type: array
            items:
              type: object
              properties:
                name: { type: string }
                uri: { ref: StringMatch }
                scheme: { ref: StringMatch }
                method: { ref: StringMatch }
                authority: { ref: StringMatch }
                headers: { type: map, values: { ref: StringMatch } }
                port: { type: integer }
                sourceLabels: { ref: labels }
                gateways: { type: array, items: { type: string } }
                queryParams: { type: map, values: { ref: StringMatch } }
                ignoreUriCase: { type: boolean }
                withoutHeaders: { type: map, values: { ref: StringMatch } }
                sourceNamespace: { type: string }
                statPrefix: { type: string }
          route:
            type: array
            items:
              type: object
              required: [destination]
              properties: { destination: { ref: Destination }, weight: { type: integer }, headers: { ref: Headers } }
          redirect: { type: struct }
          directResponse:
            type: object
            required: [status]
            properties:
              status: { type: integer }
              body: { type: object, exactly_one_of: [string, bytes], properties: { string: { type: string }, bytes: { type: string } } }
          delegate: { type: struct }
          rewrite: { type: struct }
          timeout: { type: string }
          retries: { type: struct }
          fault: { type: struct }
          mirror: { ref: Destination }
          mirrors: { type: array, items: { type: struct } }
          mirrorPercentage: { type: struct }
          corsPolicy: { type: struct }
          headers: { ref: Headers }
"#;

/// Checks `v` against schema `node`; appends "path: problem" lines.
fn check(v: &Value, node: &Value, defs: &Value, path: &str, errors: &mut Vec<String>) {
    if let Some(r) = node.get("ref").and_then(Value::as_str) {
        let target = defs.get(r).unwrap_or_else(|| panic!("schema: unknown ref {r}"));
        return check(v, target, defs, path, errors);
    }
    if let Some(allowed) = node.get("enum").and_then(Value::as_sequence) {
        if !allowed.contains(v) {
            errors.push(format!("{path}: {v:?} is not one of {allowed:?}"));
        }
        return;
    }
    let ty = node.get("type").and_then(Value::as_str).unwrap_or("object");
    let ok = match ty {
        "object" | "map" | "struct" => v.is_mapping(),
        "array" => v.is_sequence(),
        "string" => v.is_string(),
        "integer" => v.as_i64().is_some(),
        "boolean" => v.is_bool(),
        other => panic!("schema: unknown type {other}"),
    };
    if !ok {
        errors.push(format!("{path}: expected {ty}, found {v:?}"));
        return;
    }
    match ty {
        "object" => {
            let map = v.as_mapping().unwrap();
            let props = node.get("properties").and_then(Value::as_mapping).cloned().unwrap_or_default();
            for (k, child) in map {
                let key = k.as_str().unwrap_or("?");
                match props.get(k) {
                    Some(schema) => check(child, schema, defs, &format!("{path}.{key}"), errors),
                    None => errors.push(format!("{path}.{key}: unknown field")),
                }
            }
            for r in node.get("required").and_then(Value::as_sequence).into_iter().flatten() {
                if !map.contains_key(r) {
                    errors.push(format!("{path}: missing required {}", r.as_str().unwrap_or("?")));
                }
            }
            let present = |keys: &Value| keys.as_sequence().map(|ks| ks.iter().filter(|k| map.contains_key(*k)).count()).unwrap_or(0);
            if let Some(keys) = node.get("exactly_one_of") {
                if present(keys) != 1 {
                    errors.push(format!("{path}: exactly one of {keys:?} must be set"));
                }
            }
            if let Some(keys) = node.get("at_most_one_of") {
                if present(keys) > 1 {
                    errors.push(format!("{path}: at most one of {keys:?} may be set"));
                }
            }
        }
        "map" => {
            if let Some(values) = node.get("values") {
                for (k, child) in v.as_mapping().unwrap() {
                    check(child, values, defs, &format!("{path}.{}", k.as_str().unwrap_or("?")), errors);
                }
            }
        }
        "array" => {
            if let Some(items) = node.get("items") {
                for (i, child) in v.as_sequence().unwrap().iter().enumerate() {
                    check(child, items, defs, &format!("{path}[{i}]"), errors);
                }
            }
        }
        "string" => {
            let text = v.as_str().unwrap();
            if let Some(schemes) = node.get("url_schemes").and_then(Value::as_sequence) {
                if let Some((scheme, _)) = text.split_once("://") {
                    if !schemes.iter().any(|s| s.as_str() == Some(scheme)) {
                        errors.push(format!("{path}: URL scheme {scheme} is not one of {schemes:?}"));
                    }
                }
            }
            if let Some(n) = node.get("hex_len").and_then(Value::as_u64) {
                if text.len() as u64 != n || !text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
                    errors.push(format!("{path}: expected {n} lowercase hex characters"));
                }
            }
        }
        _ => {}
    }
}

fn schema() -> Value {
    serde_yaml::from_str(ISTIO_SCHEMA).expect("the embedded schema parses")
}

/// Schema problems of one manifest document (empty: valid).
fn schema_errors(doc: &Value) -> Vec<String> {
    let schema = schema();
    let mut errors = Vec::new();
    let (api, kind, name) = (s(doc, "apiVersion"), s(doc, "kind"), s(doc, "metadata.name"));
    if api.is_empty() || kind.is_empty() {
        errors.push("apiVersion and kind are required".into());
    } else if !KNOWN_KINDS.contains(&(api, kind)) {
        errors.push(format!("unknown kind {api}/{kind}"));
    }
    if kind != "Kustomization" && name.is_empty() {
        errors.push(format!("{kind}: metadata.name is required"));
    }
    if let Some(spec_schema) = schema.get(kind) {
        check(get(doc, "spec"), spec_schema, &schema["definitions"], &format!("{kind}/{name}.spec"), &mut errors);
    }
    errors
}

#[test]
fn every_manifest_parses_names_a_known_kind_and_matches_its_schema() {
    let docs = manifests();
    let mut errors = Vec::new();
    for (file, doc) in &docs {
        errors.extend(schema_errors(doc).into_iter().map(|e| format!("{file}: {e}")));
    }
    assert!(errors.is_empty(), "manifest problems:\n{}", errors.join("\n"));
    for kind in ["WasmPlugin", "EnvoyFilter", "VirtualService", "Deployment", "Service", "NetworkPolicy"] {
        assert!(docs.iter().any(|(_, d)| s(d, "kind") == kind), "no {kind} in envoy/istio/");
    }
}

#[test]
fn the_schema_check_catches_what_the_crds_would_silently_drop_or_refuse() {
    let bad: Value = serde_yaml::from_str(
        r#"
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: { name: x }
spec:
  selector: { matchLabels: { istio: ingressgateway } }
  targetRefs: [{ kind: Gateway, name: g }]
  url: ftp://example.com/x.wasm
  sha256: ABC
  phase: AUTHENTICATION
  failStrategy: FAIL_CLOSED
  priorty: 10
"#,
    )
    .unwrap();
    let errors = schema_errors(&bad).join("\n");
    for expected in ["at most one of", "URL scheme ftp", "hex characters", "phase", "failStrategy", "priorty: unknown field"] {
        assert!(errors.contains(expected), "expected {expected:?} among:\n{errors}");
    }
    let no_url: Value = serde_yaml::from_str("apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {name: x}\nspec: {}\n").unwrap();
    assert!(schema_errors(&no_url).join("\n").contains("missing required url"));
    let unknown: Value = serde_yaml::from_str("apiVersion: networking.istio.io/v1alpha3\nkind: VirtualServce\nmetadata: {name: x}\n").unwrap();
    assert!(schema_errors(&unknown).join("\n").contains("unknown kind"));
    let vs: Value = serde_yaml::from_str(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: x}\nspec:\n  http:\n  - match: [{uri: {prefix: /a, exact: /a}}]\n    route: [{weight: 1}]\n",
    )
    .unwrap();
    let errors = schema_errors(&vs).join("\n");
    assert!(errors.contains("exactly one of") && errors.contains("missing required destination"), "{errors}");
}

fn find<'a>(docs: &'a [(String, Value)], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .map(|(_, d)| d)
        .find(|d| s(d, "kind") == kind && s(d, "metadata.name") == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in envoy/istio/"))
}

/// An Istio outbound cluster name, `outbound|<port>||<service FQDN>`:
/// (host, port).
fn istio_cluster(name: &str) -> (String, u64) {
    let parts: Vec<&str> = name.split('|').collect();
    match parts.as_slice() {
        ["outbound", port, "", host] => (host.to_string(), port.parse().unwrap_or_else(|_| panic!("{name}: port"))),
        _ => panic!("{name} is not an Istio outbound cluster (outbound|<port>||<service>)"),
    }
}

/// The access log's gRPC cluster in the EnvoyFilter's HCM patch.
fn audit_cluster(docs: &[(String, Value)]) -> String {
    let hcm = hcm_patch(docs);
    let common = &get(&hcm, "access_log")[0]["typed_config"]["common_config"];
    s(common, "grpc_service.envoy_grpc.cluster_name").to_string()
}

/// The EnvoyFilter's patch of the HTTP connection manager.
fn hcm_patch(docs: &[(String, Value)]) -> Value {
    let ef = find(docs, "EnvoyFilter", "mcp-gateway");
    get(ef, "spec.configPatches")
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| s(p, "applyTo") == "NETWORK_FILTER" && s(p, "patch.operation") == "MERGE")
        .map(|p| get(p, "patch.value.typed_config").clone())
        .expect("the HCM patch")
}

/// `name.namespace.svc.cluster.local` → the Service's ports.
fn service_ports(docs: &[(String, Value)], host: &str) -> Vec<u64> {
    let mut parts = host.split('.');
    let (name, ns) = (parts.next().unwrap(), parts.next().unwrap_or(""));
    assert!(host.ends_with(".svc.cluster.local"), "{host}: expected a cluster-local Service name");
    let svc = find(docs, "Service", name);
    assert_eq!(s(svc, "metadata.namespace"), ns, "{host}");
    get(svc, "spec.ports").as_sequence().unwrap().iter().filter_map(|p| get(p, "port").as_u64()).collect()
}

#[test]
fn the_manifests_agree_with_each_other_and_with_the_filter() {
    let docs = manifests();
    let plugin = find(&docs, "WasmPlugin", "mcp-gateway");
    assert_eq!(s(plugin, "spec.phase"), "AUTHN");
    assert_eq!(s(plugin, "spec.failStrategy"), "FAIL_CLOSE");
    assert_eq!(get(plugin, "spec.selector.matchLabels.istio").as_str(), Some("ingressgateway"));

    // The plugin configuration is one the filter itself accepts, once the
    // secret placeholder is filled; the placeholder is no secret.
    let config = get(plugin, "spec.pluginConfig");
    assert!(s(config, "snapshot_secret").starts_with("${") && s(config, "snapshot_secret").ends_with('}'), "the snapshot secret must be a placeholder");
    let filled = serde_json::to_string(config).unwrap().replace("${MCP_SNAPSHOT_SECRET}", "validate-only-not-a-secret-0123456789");
    let parsed = mcp_filter_core::config::PluginConfig::parse(filled.as_bytes()).unwrap_or_else(|e| panic!("the filter refuses the WasmPlugin's pluginConfig: {e}"));

    // The filter acts for the InfraBox host(s) the VirtualService serves.
    let vs = find(&docs, "VirtualService", "infrabox");
    let vs_hosts: Vec<&str> = get(vs, "spec.hosts").as_sequence().unwrap().iter().filter_map(Value::as_str).collect();
    assert_eq!(parsed.hosts.names(), vs_hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>().as_slice());
    assert_eq!(parsed.grpc_secret, "validate-only-not-a-secret-0123456789", "the filter's gRPC secret is the rendered one");

    // The clusters the filter calls and the audit log's cluster are Istio's
    // outbound clusters of the control plane's internal Service (mutual
    // TLS), on the ports of its listeners; the gRPC port speaks HTTP/2.
    let cp = find(&docs, "Deployment", "mcp-control-plane");
    let container = &get(cp, "spec.template.spec.containers")[0];
    let cm = find(&docs, "ConfigMap", "mcp-control-plane");
    let listen_port = |var: &str| s(cm, &format!("data.{var}")).rsplit(':').next().unwrap().parse::<u64>().unwrap();
    let audit = audit_cluster(&docs);
    let mut hosts = Vec::new();
    for (cluster, var) in [(&parsed.snapshot_cluster, "MCP_INTERNAL_ADDR"), (&parsed.ratelimit_cluster, "MCP_GRPC_ADDR"), (&audit, "MCP_GRPC_ADDR")] {
        let (host, port) = istio_cluster(cluster);
        assert_eq!(port, listen_port(var), "cluster {cluster} must reach {var}");
        assert!(service_ports(&docs, &host).contains(&port), "cluster {cluster}: {host} has no port {port}");
        let container_ports: Vec<u64> = get(container, "ports").as_sequence().unwrap().iter().filter_map(|p| get(p, "containerPort").as_u64()).collect();
        assert!(container_ports.contains(&port), "the control plane does not expose {port}");
        hosts.push(host);
    }
    assert_eq!(parsed.snapshot_authority, hosts[0]);
    let internal_svc = find(&docs, "Service", hosts[0].split('.').next().unwrap());
    assert!(get(internal_svc, "spec.clusterIP").is_null(), "a headless Service gets an ORIGINAL_DST cluster, which the filter cannot call");
    let grpc_port = get(internal_svc, "spec.ports").as_sequence().unwrap().iter().find(|p| get(p, "port").as_u64() == Some(listen_port("MCP_GRPC_ADDR"))).unwrap();
    assert_eq!(s(grpc_port, "appProtocol"), "grpc", "Istio speaks HTTP/2 to the gRPC port only for appProtocol grpc");

    // Mutual TLS (DESIGN §16): the control plane has a sidecar and accepts
    // mTLS only; the gateway speaks ISTIO_MUTUAL to both of its Services;
    // only the gateway's identity may call it.
    assert_eq!(get(cp, "spec.template.metadata.annotations").get("sidecar.istio.io/inject").and_then(Value::as_str), Some("true"));
    let ns = find(&docs, "Namespace", "mcp-gateway");
    assert_eq!(get(ns, "metadata.labels").get("istio-injection").and_then(Value::as_str), Some("enabled"));
    let pa = find(&docs, "PeerAuthentication", "mcp-control-plane");
    assert_eq!(s(pa, "spec.mtls.mode"), "STRICT");
    assert_eq!(s(pa, "metadata.namespace"), "mcp-gateway");
    for host in [hosts[0].clone(), "mcp-control-plane.mcp-gateway.svc.cluster.local".to_string()] {
        let dr = docs
            .iter()
            .map(|(_, d)| d)
            .find(|d| s(d, "kind") == "DestinationRule" && s(d, "spec.host") == host)
            .unwrap_or_else(|| panic!("no DestinationRule for {host}"));
        assert_eq!(s(dr, "spec.trafficPolicy.tls.mode"), "ISTIO_MUTUAL", "{host}");
    }
    let authz = find(&docs, "AuthorizationPolicy", "mcp-control-plane");
    assert_eq!(s(authz, "spec.action"), "ALLOW");
    let principals = serde_yaml::to_string(get(authz, "spec.rules")).unwrap();
    assert!(principals.contains("ns/istio-system/sa/istio-ingressgateway"), "{principals}");

    // The HCM: the audit stream with the internal credential, underscores
    // refused, Envoy's own view of the client, and its own request ids.
    let hcm = hcm_patch(&docs);
    let ef = serde_yaml::to_string(&hcm).unwrap();
    assert!(ef.contains("filter_state_objects_to_log") && ef.contains("wasm.mcp_audit"));
    let metadata = &get(&hcm, "access_log")[0]["typed_config"]["common_config"]["grpc_service"]["initial_metadata"][0];
    assert_eq!((s(metadata, "key"), s(metadata, "value")), ("authorization", "Bearer ${MCP_SNAPSHOT_SECRET}"));
    assert_eq!(s(&hcm, "common_http_protocol_options.headers_with_underscores_action"), "REJECT_REQUEST");
    assert_eq!(get(&hcm, "use_remote_address").as_bool(), Some(true));
    assert_eq!(get(&hcm, "xff_num_trusted_hops").as_u64(), Some(0));
    assert_eq!(get(&hcm, "preserve_external_request_id").as_bool(), Some(false));
    assert_eq!(get(&hcm, "generate_request_id").as_bool(), Some(true));

    // Routes: /internal answered by the gateway itself, the token API to
    // the control plane's API port, nothing else to the control plane.
    let routes = get(vs, "spec.http").as_sequence().unwrap();
    let internal = routes.iter().position(|r| get(r, "match").as_sequence().is_some_and(|m| m.iter().any(|m| s(m, "uri.prefix") == "/internal"))).expect("an /internal route");
    assert!(get(&routes[internal], "directResponse.status").as_u64() == Some(404) && get(&routes[internal], "route").is_null());
    assert_eq!(get(&routes[internal], "match")[0]["ignoreUriCase"].as_bool(), Some(true));
    let tokens = routes.iter().position(|r| s(r, "name") == "mcp-token-api").expect("the token API route");
    assert!(internal < tokens, "/internal must be matched first");
    assert_eq!(
        get(&routes[tokens], "headers.request.set").get("x-mcp-client-address").and_then(Value::as_str),
        Some("%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"),
        "the token API reads the client address the gateway set"
    );
    let uris: Vec<String> = get(&routes[tokens], "match").as_sequence().unwrap().iter().map(|m| serde_yaml::to_string(get(m, "uri")).unwrap()).collect();
    assert_eq!(uris, vec!["exact: /api/v1/mcp/tokens\n".to_string(), "prefix: /api/v1/mcp/tokens/\n".to_string()]);
    let dest = &get(&routes[tokens], "route")[0]["destination"];
    assert_eq!(get(dest, "port.number").as_u64(), Some(listen_port("MCP_HTTP_ADDR")));
    assert!(service_ports(&docs, s(dest, "host")).contains(&listen_port("MCP_HTTP_ADDR")));
    for (i, r) in routes.iter().enumerate().filter(|(i, _)| *i != tokens) {
        assert!(!serde_yaml::to_string(r).unwrap().contains("mcp-control-plane"), "route {i} reaches the control plane");
    }

    // Every route of InfraBox's stock ingress survives (INFRABOX_API.md §8,
    // deploy/infrabox/templates/ingress.yaml), in its namespace, and no
    // route is shadowed by an earlier, broader one (Istio matches in order).
    let ns = "infrabox-system.svc.cluster.local";
    let stock = [
        ("/api", "infrabox-api", 8080),
        ("/github/hook", "infrabox-github-trigger", 8080),
        ("/github/auth", "infrabox-api", 8080),
        ("/saml", "infrabox-api", 8080),
        ("/v2", "infrabox-docker-registry", 8080),
        ("/dashboard", "infrabox-static", 80),
        ("/", "infrabox-static", 80),
    ];
    let prefixes = |r: &Value| -> Vec<String> {
        get(r, "match").as_sequence().map(|m| m.iter().filter_map(|m| get(m, "uri.prefix").as_str().map(str::to_string)).collect()).unwrap_or_default()
    };
    for (prefix, service, port) in stock {
        let (i, r) = routes.iter().enumerate().find(|(_, r)| prefixes(r).iter().any(|p| p == prefix)).unwrap_or_else(|| panic!("no route for {prefix}"));
        let dest = &get(r, "route")[0]["destination"];
        assert_eq!((s(dest, "host"), get(dest, "port.number").as_u64()), (format!("{service}.{ns}").as_str(), Some(port)), "{prefix}");
        for earlier in &routes[..i] {
            for p in prefixes(earlier) {
                assert!(!prefix.starts_with(&p) || p == "/internal", "{prefix} is shadowed by the earlier prefix {p}");
            }
        }
    }
    assert_eq!(prefixes(routes.last().unwrap()).last().map(String::as_str), Some("/"), "the catch-all comes last");
    assert!(tokens < routes.iter().position(|r| prefixes(r).contains(&"/api".to_string())).unwrap(), "the token API before /api");
    assert_eq!(s(cm, "data.INFRABOX_URL"), format!("http://infrabox-api.{ns}:8080"), "the control plane mints credentials at the same API");

    // The optional fence: InfraBox's API only from the gateway, InfraBox's
    // own namespaces and the control plane; its in-app MCP routes denied.
    let fence = find(&docs, "NetworkPolicy", "infrabox-api-behind-the-gateway");
    assert_eq!(s(fence, "metadata.namespace"), "infrabox-system");
    assert_eq!(s(fence, "spec.podSelector.matchLabels.app"), "infrabox-api");
    let from = serde_yaml::to_string(get(fence, "spec.ingress")).unwrap();
    for must in ["istio: ingressgateway", "infrabox-system", "infrabox-worker", "mcp-gateway", "mcp-control-plane", "port: 8080"] {
        assert!(from.contains(must), "the fence must admit {must}: {from}");
    }
    let deny = find(&docs, "AuthorizationPolicy", "infrabox-api-no-in-app-mcp");
    assert_eq!(s(deny, "spec.action"), "DENY");
    let paths = serde_yaml::to_string(get(deny, "spec.rules")).unwrap();
    assert!(paths.contains("/api/v1/mcp/*") && paths.contains("- /api/v1/mcp\n"), "{paths}");

    // The control plane: secrets only by reference, probes on /healthz of
    // the internal listener, non-root.
    for env in get(container, "env").as_sequence().unwrap() {
        assert!(get(env, "value").is_null() && !get(env, "valueFrom.secretKeyRef.name").is_null(), "{env:?}: secrets come from a Secret");
    }
    for var in ["DATABASE_URL", "MCP_SNAPSHOT_SECRET", "MCP_CREDENTIAL_KEY", "REDIS_URL"] {
        assert!(get(container, "env").as_sequence().unwrap().iter().any(|e| s(e, "name") == var), "{var} is not set");
        assert!(get(cm, &format!("data.{var}")).is_null(), "{var} must not be in the ConfigMap");
    }
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(s(container, &format!("{probe}.httpGet.path")), "/healthz");
        assert_eq!(s(container, &format!("{probe}.httpGet.port")), "http-internal");
    }
    assert_eq!(get(cp, "spec.template.spec.securityContext.runAsNonRoot").as_bool(), Some(true));
    assert!(!docs.iter().any(|(_, d)| s(d, "kind") == "Secret"), "no Secret manifests: secrets are created by the operator");

    // kustomization.yaml lists every manifest but the two rendered with the
    // internal secret at apply time (the EnvoyFilter and the WasmPlugin).
    let k = docs.iter().map(|(_, d)| d).find(|d| s(d, "kind") == "Kustomization").unwrap();
    let listed: Vec<&str> = get(k, "resources").as_sequence().unwrap().iter().filter_map(Value::as_str).collect();
    // (and the optional fence of InfraBox's API, applied on its own).
    let rendered = ["kustomization.yaml", "wasm-plugin.yaml", "envoy-filter.yaml", "infrabox-fence.yaml"];
    let mut files: Vec<String> = docs.iter().map(|(f, _)| f.clone()).filter(|f| !rendered.contains(&f.as_str())).collect();
    files.dedup();
    assert_eq!(listed, files.iter().map(String::as_str).collect::<Vec<_>>());
}

#[test]
fn no_secret_material_in_manifests_or_image_files() {
    let mut files: Vec<PathBuf> = Vec::new();
    for dir in ["envoy/istio", "docker"] {
        files.extend(std::fs::read_dir(repo_root().join(dir)).unwrap().flatten().map(|e| e.path()));
    }
    files.push(repo_root().join("scripts/build-images.sh"));
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        assert!(!text.contains("PRIVATE KEY"), "{} holds a private key", f.display());
        // A 32-byte key in hex, as MCP_CREDENTIAL_KEY takes it.
        let hex_run = text.split(|c: char| !c.is_ascii_hexdigit()).any(|w| w.len() >= 64);
        assert!(!hex_run, "{} holds what looks like a key", f.display());
    }
}

/// Deep merge as Istio's MERGE applies it to a protobuf: maps merge, lists
/// append, scalars replace.
fn merge(base: &mut Value, patch: &Value) {
    match (base, patch) {
        (Value::Mapping(b), Value::Mapping(p)) => {
            for (k, v) in p {
                match b.get_mut(k) {
                    Some(existing) => merge(existing, v),
                    None => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (Value::Sequence(b), Value::Sequence(p)) => b.extend(p.iter().cloned()),
        (b, p) => *b = p.clone(),
    }
}

#[test]
fn the_istio_envoy_fragments_validate_with_the_filter_on_every_installed_envoy() {
    let docs = manifests();
    let hcm_patch: Value =
        serde_yaml::from_str(&serde_yaml::to_string(&hcm_patch(&docs)).unwrap().replace("${MCP_SNAPSHOT_SECRET}", "validate-only-not-a-secret-0123456789"))
            .unwrap();
    let plugin = find(&docs, "WasmPlugin", "mcp-gateway");
    let plugin_config =
        serde_json::to_string(get(plugin, "spec.pluginConfig")).unwrap().replace("${MCP_SNAPSHOT_SECRET}", "validate-only-not-a-secret-0123456789");
    let parsed = mcp_filter_core::config::PluginConfig::parse(plugin_config.as_bytes()).unwrap();
    // The outbound clusters Istio gives the gateway for the control plane
    // (its mTLS transport socket comes from Istio's agent, absent here).
    let mut names = vec![parsed.snapshot_cluster.clone(), parsed.ratelimit_cluster.clone(), audit_cluster(&docs)];
    names.dedup();
    let clusters: Vec<Value> = names
        .iter()
        .map(|name| {
            let (_, port) = istio_cluster(name);
            let mut cluster = serde_json::json!({
                "name": name,
                "type": "STATIC",
                "connect_timeout": "0.25s",
                "load_assignment": {
                    "cluster_name": name,
                    "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}],
                },
            });
            if port == 9002 {
                cluster["typed_extension_protocol_options"] = serde_json::json!({
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                        "explicit_http_config": {"http2_protocol_options": {}},
                    }
                });
            }
            serde_yaml::to_value(cluster).unwrap()
        })
        .collect();
    // The gateway's listener as Istio would shape it around the patches:
    // the filter (what the WasmPlugin becomes) before the router.
    let mut hcm: Value = serde_yaml::from_str(&format!(
        r#"
"@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
stat_prefix: gateway
route_config:
  virtual_hosts:
  - name: all
    domains: ["*"]
    routes:
    - match: {{ prefix: "/" }}
      direct_response: {{ status: 200 }}
http_filters:
- name: mcp_gateway
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
    config:
      name: mcp_gateway
      root_id: {root_id}
      failure_policy: FAIL_CLOSED
      configuration:
        "@type": type.googleapis.com/google.protobuf.StringValue
        value: '{plugin_config}'
      vm_config:
        runtime: envoy.wasm.runtime.v8
        code: {{ local: {{ filename: "{wasm}" }} }}
- name: envoy.filters.http.router
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"#,
        root_id = s(plugin, "spec.pluginName"),
        wasm = wasm_path().display(),
    ))
    .unwrap();
    merge(&mut hcm, &hcm_patch);
    let mut bootstrap = Mapping::new();
    bootstrap.insert("node".into(), serde_yaml::from_str("{ id: validate, cluster: istio-ingressgateway }").unwrap());
    let listener: Value = serde_yaml::from_str(
        "name: gateway\naddress: { socket_address: { address: 127.0.0.1, port_value: 18443 } }\nfilter_chains: [{ filters: [{ name: envoy.filters.network.http_connection_manager }] }]",
    )
    .unwrap();
    let mut listener = listener;
    listener["filter_chains"][0]["filters"][0]["typed_config"] = hcm;
    let mut resources = Mapping::new();
    resources.insert("listeners".into(), Value::Sequence(vec![listener]));
    resources.insert("clusters".into(), Value::Sequence(clusters));
    bootstrap.insert("static_resources".into(), Value::Mapping(resources));
    let yaml = serde_yaml::to_string(&Value::Mapping(bootstrap)).unwrap();
    for (version, bin) in installed_envoys() {
        let (ok, out) = validate(&bin, &format!("istio-{version}"), &yaml);
        assert!(ok, "the Istio fragments do not validate on Envoy {version}:\n{out}\n---\n{yaml}");
    }
}

//! `ringtun run`'s control-plane flags, under ztunnel's environment variable names, and the
//! [`XdsOptions`] they make.

use std::time::Duration;

use clap::Args;
use ringtun_hbone::Identity;

use super::values::parse_secs;
use crate::xds::ca::CaOptions;
use crate::xds::channel::{with_scheme, ADDRESS_FORM, DEFAULT_ROOT_PATH};
use crate::xds::XdsError;
use crate::xds::{Endpoint, NodeInfo, RootCert, Token, XdsOptions};
use crate::EngineError;

/// Where istiod is and who this proxy is to it.
#[derive(Args, Debug, Clone, Default)]
pub struct XdsArgs {
    /// istiod's address (`https://host:port`; a bare `host:port` is taken as https, as ztunnel
    /// does). When set and not empty, workloads, services and
    /// policies come from istiod over Delta xDS instead of --config (LOCAL_XDS_PATH).
    #[arg(long, env = "XDS_ADDRESS")]
    pub xds_address: Option<String>,
    /// istiod's root certificate: a PEM file, or the PEM text itself (ztunnel's reading).
    #[arg(long, env = "XDS_ROOT_CA", default_value = DEFAULT_ROOT_PATH)]
    pub xds_root_ca: String,
    /// A name istiod's certificate may carry instead of the address's host.
    #[arg(long, env = "ALT_XDS_HOSTNAME")]
    pub alt_xds_hostname: Option<String>,
    /// The pod's token, sent as `authorization: Bearer …`: a file (read at each connection) or
    /// the token itself; by default ./var/run/secrets/tokens/istio-token when it exists.
    #[arg(long, env = "AUTH_TOKEN")]
    pub auth_token: Option<String>,
    /// This pod's IP, in the xDS node id (ztunnel's default 1.1.1.1).
    #[arg(long, env = "INSTANCE_IP")]
    pub instance_ip: Option<String>,
    /// This pod's name, in the xDS node id and metadata.
    #[arg(long, env = "POD_NAME", default_value = "")]
    pub pod_name: String,
    /// This pod's namespace, in the xDS node id and metadata.
    #[arg(long, env = "POD_NAMESPACE", default_value = "")]
    pub pod_namespace: String,
    /// istiod's CA (`https://host:port`; a bare `host:port` is taken as https, as ztunnel does).
    /// Used when no certificate files (--cert-chain, --key, --roots) are given; by default the
    /// XDS_ADDRESS istiod. Empty: no CA.
    #[arg(long, env = "CA_ADDRESS")]
    pub ca_address: Option<String>,
    /// The CA's root certificate: a PEM file, or the PEM text itself.
    #[arg(long, env = "CA_ROOT_CA", default_value = DEFAULT_ROOT_PATH)]
    pub ca_root_ca: String,
    /// A name the CA's certificate may carry instead of the address's host.
    #[arg(long, env = "ALT_CA_HOSTNAME")]
    pub alt_ca_hostname: Option<String>,
    /// Lifetime asked of the CA for each certificate (seconds or a duration: `24h`, ztunnel's
    /// default); istiod may cap it. Renewed at half its life.
    #[arg(long, env = "SECRET_TTL", default_value = "24h", value_parser = |s: &str| parse_secs(s, "SECRET_TTL"))]
    pub secret_ttl: Duration,
    /// The proxy's service account, for its own certificate from the CA: in dedicated mode when
    /// PROXY_WORKLOAD_INFO names none (default `default`), in shared mode the node proxy's
    /// (default `ztunnel`, in POD_NAMESPACE or `istio-system`).
    #[arg(long, env = "SERVICE_ACCOUNT")]
    pub service_account: Option<String>,
    /// On-demand addresses (ztunnel's XDS_ON_DEMAND, `true` or `false`): subscribe to no
    /// address and ask istiod for each destination a connection meets that is not known yet.
    /// Refused with the DNS proxy on, as ztunnel refuses it.
    #[arg(long, env = "XDS_ON_DEMAND", default_value = "false", action = clap::ArgAction::Set, value_parser = clap::value_parser!(bool))]
    pub xds_on_demand: bool,
    /// How long a connection to an address asked for on demand waits for istiod's answer
    /// before it is routed as an unknown destination (ringtun's own bound: ztunnel waits
    /// without one).
    #[arg(long, env = "XDS_ON_DEMAND_TIMEOUT", default_value = "5s", value_parser = |s: &str| parse_secs(s, "XDS_ON_DEMAND_TIMEOUT"))]
    pub xds_on_demand_timeout: Duration,
}

impl XdsArgs {
    /// The client's options, or `None` when XDS_ADDRESS is unset or empty (local config).
    pub(super) fn options(
        &self,
        cluster_id: &str,
        node_name: Option<&str>,
        mark: u32,
        dns_capture: bool,
    ) -> Result<Option<XdsOptions>, EngineError> {
        let url = self.xds_address.as_deref().map(str::trim).unwrap_or("");
        if url.is_empty() {
            return Ok(None);
        }
        if self.xds_on_demand && dns_capture {
            // ztunnel's words (its config validation).
            return Err(EngineError::Usage(
                "DNS proxy does not currently support on-demand mode: set XDS_ON_DEMAND=false or ISTIO_META_DNS_CAPTURE=false".into(),
            ));
        }
        let url = with_scheme(url).map_err(|e| bad_address("XDS_ADDRESS (--xds-address)", e))?;
        let node = NodeInfo {
            ip: self.instance_ip.clone(),
            pod_name: self.pod_name.clone(),
            pod_namespace: self.pod_namespace.clone(),
            node_name: node_name.unwrap_or_default().to_owned(),
            ..Default::default()
        }
        .with_env_metadata(std::env::vars());
        let endpoint = Endpoint {
            url,
            root: RootCert::from_setting(&self.xds_root_ca),
            alt_hostname: self.alt_xds_hostname.clone(),
            token: Token::from_setting(self.auth_token.as_deref()),
            cluster_id: cluster_id.to_owned(),
            mark,
        };
        endpoint
            .check()
            .map_err(|e| bad_address("XDS_ADDRESS (--xds-address)", e))?;
        Ok(Some(XdsOptions {
            endpoint,
            node,
            on_demand: self
                .xds_on_demand
                .then_some(self.xds_on_demand_timeout.max(Duration::from_millis(1))),
        }))
    }

    /// The CA client's options, or `None` when no CA is set: `CA_ADDRESS` when set (empty: no
    /// CA), else the XDS_ADDRESS istiod when there is one. `workload`: dedicated mode's
    /// (namespace, service account named by PROXY_WORKLOAD_INFO); without it the proxy is a node
    /// proxy, which asks on behalf of the identities it serves.
    pub(super) fn ca_options(
        &self,
        trust_domain: &str,
        cluster_id: &str,
        mark: u32,
        xds: Option<&XdsOptions>,
        workload: Option<(&str, Option<&str>)>,
    ) -> Result<Option<CaOptions>, EngineError> {
        let url = match self.ca_address.as_deref().map(str::trim) {
            Some("") => return Ok(None),
            Some(u) => with_scheme(u).map_err(|e| bad_address("CA_ADDRESS (--ca-address)", e))?,
            None => match xds {
                Some(x) => x.endpoint.url.clone(),
                None => return Ok(None),
            },
        };
        let endpoint = Endpoint {
            url,
            root: RootCert::from_setting(&self.ca_root_ca),
            alt_hostname: self.alt_ca_hostname.clone(),
            token: Token::from_setting(self.auth_token.as_deref()),
            cluster_id: cluster_id.to_owned(),
            mark,
        };
        endpoint
            .check()
            .map_err(|e| bad_address("CA_ADDRESS (--ca-address)", e))?;
        let sa = self.service_account.as_deref().filter(|s| !s.is_empty());
        let identity = match workload {
            Some((ns, named)) => Identity::new(trust_domain, ns, named.or(sa).unwrap_or("default")),
            None => {
                let ns = Some(self.pod_namespace.as_str()).filter(|s| !s.is_empty());
                Identity::new(
                    trust_domain,
                    ns.unwrap_or("istio-system"),
                    sa.unwrap_or("ztunnel"),
                )
            }
        };
        Ok(Some(CaOptions {
            endpoint,
            ttl: self.secret_ttl,
            identity,
            impersonate: workload.is_none(),
        }))
    }
}

/// A refused address setting, naming the variable and the form it takes.
fn bad_address(var: &str, e: XdsError) -> EngineError {
    EngineError::Usage(format!("{var}: {e}; expected {ADDRESS_FORM}"))
}

//! End-to-end tests: the real `keyholderd` and `keyholder` binaries against
//! SoftHSM2 and real peers (the stock `age` binary, Python grpcio).

mod util;

mod api_docs;
mod audit;
mod bad_input;
mod cluster_pki;
mod connections;
mod crash;
mod etcd_cluster;
mod etcd_docs;
mod etcd_storage;
mod faults;
mod json_everywhere;
mod kube;
mod kube_secret;
mod lifetimes;
mod matrix;
mod memory;
mod message_size;
mod metrics;
mod nss;
mod output_paths;
mod peer;
mod pinentry;
mod policy;
mod policy_docs;
mod python;
mod remote;
mod remote_docs;
mod round_trip;
mod secret_history;
mod secrets_in_processes;
mod socket_trust;
mod ssh;
mod stock_grpc;
mod team;
mod token_docs;
mod vault_files;
mod yubikey;
mod yubikey_docs;

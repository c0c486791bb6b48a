"""Kafka on this machine, for development, tests and the demo: Apache Kafka (KRaft, fetched by Maven) and the embedded
broker (`domaintok broker`), and the one-command demo with the process harness the integration tests reuse
(`domaintok demo`). The workers never import it: a deployment brings its own Kafka."""

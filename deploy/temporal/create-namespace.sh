#!/bin/sh
# Creates the default namespace and QWIT's search attributes. Safe to run again.
set -eu
temporal operator namespace describe -n default >/dev/null 2>&1 \
  || temporal operator namespace create -n default --retention 72h
for attribute in QwitFlow QwitStatus; do
  temporal operator search-attribute create -n default --name "$attribute" --type Keyword
done
echo "namespace ready"

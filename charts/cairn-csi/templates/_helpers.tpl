{{/* Common names and labels. */}}
{{- define "cairn.name" -}}cairn-csi{{- end }}
{{- define "cairn.driver" -}}cairn.csi.io{{- end }}

{{- define "cairn.labels" -}}
app.kubernetes.io/name: cairn-csi
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{- define "cairn.selector" -}}
app.kubernetes.io/name: cairn-csi
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "cairn.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* The local backends, and the one node that owns them (empty: any node). */}}
{{- define "cairn.localNode" -}}
{{- $nodes := list -}}
{{- range .Values.backends -}}
{{- if and (eq .kind "local") .node -}}{{- $nodes = append $nodes .node | uniq -}}{{- end -}}
{{- end -}}
{{- if gt (len $nodes) 1 -}}
{{- fail (printf "local backends pinned to several nodes (%s): one controller cannot sit beside them all; list the nodes in a backend's 'nodes' instead (served through NodeVolume objects, see docs/design.md)" (join ", " $nodes)) -}}
{{- end -}}
{{- join "" $nodes -}}
{{- end }}

{{/* Whether a backend is served on many nodes through NodeVolume objects: an lvm
backend that pins no node, or a local backend that lists its nodes. Its node plugins
then talk to the API server. */}}
{{- define "cairn.routed" -}}
{{- range .Values.backends }}
{{- if and (not .node) (or (eq .kind "lvm") (and (eq .kind "local") .nodes)) }}true{{ end }}
{{- end -}}
{{- end }}

{{/* Whether a routed backend picks its nodes by label: its node plugins read their Node. */}}
{{- define "cairn.nodeSelectors" -}}
{{- range .Values.backends }}{{ if .nodeSelector }}true{{ end }}{{ end -}}
{{- end }}

{{- define "cairn.hasLvm" -}}
{{- range .Values.backends }}{{ if eq .kind "lvm" }}true{{ end }}{{ end -}}
{{- end }}

{{- define "cairn.hasLocal" -}}
{{- range .Values.backends }}{{ if eq .kind "local" }}true{{ end }}{{ end -}}
{{- end }}

{{- define "cairn.hasNfs" -}}
{{- range .Values.backends }}{{ if eq .kind "nfs" }}true{{ end }}{{ end -}}
{{- end }}

{{/* Never two controllers side by side, even during a rollout (Deployment strategy
Recreate): a local backend's files are on one node, and an nfs backend sweeps what crashed
calls left on its export when the controller starts, which is only safe while no other
controller works there (controller.yaml also refuses replicas > 1 with nfs). */}}
{{- define "cairn.singleController" -}}
{{- if or (include "cairn.hasLocal" .) (include "cairn.hasNfs" .) }}true{{ end -}}
{{- end }}

{{/* Where the node plugin of an nfs backend mounts exports for image volumes and records
the sources of directory volumes, when the backend names no nodeMountDir: a folder of
the driver's under the kubelet's plugins directory, which the node plugin already mounts
with Bidirectional propagation (and which the kubelet's host keeps on a shared mount). */}}
{{- define "cairn.nfsDefaultMountDir" -}}
{{- printf "%s/plugins/%s/nfs" .Values.node.kubeletDir (include "cairn.driver" .) -}}
{{- end }}

{{/* The nodeMountDirs of nfs backends outside the kubelet's directory, each once, one a
line: each needs a hostPath mount of its own, with Bidirectional propagation (the host
path must then be on a shared mount, as the kubelet's directory is). */}}
{{- define "cairn.nfsMountDirs" -}}
{{- $dirs := list -}}
{{- $kubelet := printf "%s/" (.Values.node.kubeletDir | trimSuffix "/") -}}
{{- range .Values.backends -}}
{{- if and (eq .kind "nfs") .nodeMountDir (not (hasPrefix $kubelet .nodeMountDir)) -}}
{{- $dirs = append $dirs .nodeMountDir | uniq -}}
{{- end -}}
{{- end -}}
{{- join "\n" $dirs -}}
{{- end }}

{{/* hostPath volumes and mounts for the directories of local backends. */}}
{{- define "cairn.localVolumes" -}}
{{- range .Values.backends }}
{{- if eq .kind "local" }}
- name: local-{{ .name }}
  hostPath:
    path: {{ .path }}
    type: DirectoryOrCreate
{{- end }}
{{- end }}
{{- end }}

{{/* The same for the controller: only the local backends it serves itself (one node's
directory); those on many nodes are served by the node plugins. */}}
{{- define "cairn.controllerLocalVolumes" -}}
{{- range .Values.backends }}
{{- if and (eq .kind "local") (not .nodes) }}
- name: local-{{ .name }}
  hostPath:
    path: {{ .path }}
    type: DirectoryOrCreate
{{- end }}
{{- end }}
{{- end }}

{{- define "cairn.controllerLocalMounts" -}}
{{- range .Values.backends }}
{{- if and (eq .kind "local") (not .nodes) }}
- name: local-{{ .name }}
  mountPath: {{ .path }}
{{- end }}
{{- end }}
{{- end }}

{{- define "cairn.localMounts" -}}
{{- range .Values.backends }}
{{- if eq .kind "local" }}
- name: local-{{ .name }}
  mountPath: {{ .path }}
{{- end }}
{{- end }}
{{- end }}

{{/* The CSI secret parameters, pointing every secret-taking call at one Secret. */}}
{{- define "cairn.secretParameters" -}}
{{- if .secretName }}
{{- range list "provisioner" "controller-publish" "node-stage" "controller-expand" "node-expand" }}
csi.storage.k8s.io/{{ . }}-secret-name: {{ $.secretName }}
csi.storage.k8s.io/{{ . }}-secret-namespace: {{ $.secretNamespace | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* The driver container's liveness probe: the livenessprobe sidecar's /healthz (the CSI
Probe call), or without the sidecar the kubelet's own gRPC probe of the driver's health
port, service "liveness" (SERVING while the process serves, whatever its backends' health).
Argument: (list <sidecar enabled> <grpc health port>). */}}
{{- define "cairn.livenessProbe" -}}
{{- if index . 0 -}}
httpGet: {path: /healthz, port: healthz}
{{- else -}}
grpc: {port: {{ index . 1 }}, service: liveness}
{{- end }}
initialDelaySeconds: 10
periodSeconds: 20
timeoutSeconds: 5
failureThreshold: 5
{{- end }}

{{/* Where the controller mounts the Secret of a backup repository (argument: the entry):
the folder the driver config names as the repository's credentials. */}}
{{- define "cairn.backupCredentials" -}}
{{- printf "/etc/cairn/backup/%s" .name -}}
{{- end }}

{{/* The backup repositories' Secrets and directories, mounted in the controller and,
with routed backends, in the node plugins (their nodes copy backups and fill restores). */}}
{{- define "cairn.backupMounts" -}}
{{- range .Values.backupRepositories }}
{{- if .secretName }}
- {name: backup-keys-{{ .name }}, mountPath: {{ include "cairn.backupCredentials" . }}, readOnly: true}
{{- end }}
{{- if and (eq .kind "directory") .volume }}
- {name: backup-data-{{ .name }}, mountPath: {{ .path }}}
{{- end }}
{{- end }}
{{- end }}

{{- define "cairn.backupVolumes" -}}
{{- range .Values.backupRepositories }}
{{- if .secretName }}
# The Secret of backup repository {{ .name }}: its S3 keys, its encryption key.
- name: backup-keys-{{ .name }}
  secret:
    secretName: {{ .secretName }}
{{- end }}
{{- if and (eq .kind "directory") .volume }}
# Where backup repository {{ .name }} keeps its files.
- name: backup-data-{{ .name }}
  {{- toYaml .volume | nindent 2 }}
{{- end }}
{{- end }}
{{- end }}

{{/* Refuse backup repositories the driver or the pod would refuse, with the reason:
settings the schema cannot require per kind, names the driver config forbids (a
repository's name routes backup IDs, so it must differ from every backend and group),
mounts that would collide in the controller. Renders nothing. */}}
{{- define "cairn.checkBackupRepositories" -}}
{{- $taken := list -}}
{{- range .Values.backends -}}
{{- $taken = append $taken .name -}}
{{- if .group }}{{ $taken = append $taken .group }}{{ end -}}
{{- end -}}
{{- $names := list -}}
{{- /* Mount paths of the controller's driver container a repository may not take again. */ -}}
{{- $paths := list (trimSuffix "/" .Values.node.kubeletDir) -}}
{{- range .Values.backends -}}
{{- if and (eq .kind "local") .path }}{{ $paths = append $paths (trimSuffix "/" .path) }}{{ end -}}
{{- if .exportRoot }}{{ $paths = append $paths (trimSuffix "/" .exportRoot) }}{{ end -}}
{{- end -}}
{{- range .Values.backupRepositories -}}
{{- $where := printf "backupRepositories: %s (%s)" .name .kind -}}
{{- if has .name $names -}}
{{- fail (printf "backupRepositories: the name %s is used twice; each repository needs its own" .name) -}}
{{- end -}}
{{- if has .name $taken -}}
{{- fail (printf "%s: a backend or group has this name too; repository, backend and group names must all differ (a backup's ID names its repository where a volume's names its backend)" $where) -}}
{{- end -}}
{{- $names = append $names .name -}}
{{- if eq .kind "directory" -}}
{{- if not .path -}}
{{- fail (printf "%s: set path, the absolute path the repository is mounted at in the controller" $where) -}}
{{- end -}}
{{- if not .volume -}}
{{- fail (printf "%s: set volume, the pod volume source mounted at %s (such as {nfs: {server: ..., path: ...}} or {persistentVolumeClaim: {claimName: ...}}); without one the backups would land in the container and vanish with it" $where .path) -}}
{{- end -}}
{{- $path := trimSuffix "/" .path -}}
{{- range list "/csi" "/etc/cairn" "/dev" -}}
{{- if or (eq $path .) (hasPrefix (printf "%s/" .) $path) -}}
{{- fail (printf "%s: path %s is in %s, which the chart mounts for the driver itself; choose another path" $where $path .) -}}
{{- end -}}
{{- end -}}
{{- if has $path $paths -}}
{{- fail (printf "%s: path %s is mounted in the controller already (another repository's path, a backend's or the kubelet directory); each repository needs its own" $where $path) -}}
{{- end -}}
{{- $paths = append $paths $path -}}
{{- else if eq .kind "s3" -}}
{{- if not .bucket -}}
{{- fail (printf "%s: set bucket, an existing bucket (it is not created)" $where) -}}
{{- end -}}
{{- if not .secretName -}}
{{- fail (printf "%s: set secretName, a Secret in namespace %s with keys accessKeyID and secretAccessKey (and, optionally, encryptionKey)" $where $.Release.Namespace) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end }}

{{/* The external-snapshot-metadata sidecar (snapshotMetadata): the Service in front of it,
the audience of its clients' tokens, and where its TLS files are in the sidecar. */}}
{{- define "cairn.snapshotMetadataService" -}}
{{- printf "%s-snapshot-metadata" (include "cairn.name" .) -}}
{{- end }}

{{- define "cairn.snapshotMetadataAudience" -}}
{{- .Values.snapshotMetadata.audience | default (include "cairn.driver" .) -}}
{{- end }}

{{- define "cairn.snapshotMetadataTLSDir" -}}/etc/snapshot-metadata/tls{{- end }}

{{/* The CA clients verify the sidecar with, base64-encoded as the SnapshotMetadataService's
spec.caCert wants it: snapshotMetadata.caCert, or the key caSecretKey of the TLS Secret,
read from the cluster at install time (lookup). */}}
{{- define "cairn.snapshotMetadataCA" -}}
{{- $sm := .Values.snapshotMetadata -}}
{{- if $sm.caCert -}}
{{- $sm.caCert | b64enc -}}
{{- else -}}
{{- $secret := lookup "v1" "Secret" .Release.Namespace $sm.tlsSecretName | default dict -}}
{{- $ca := dig "data" $sm.caSecretKey "" $secret -}}
{{- if not $ca -}}
{{- fail (printf "snapshotMetadata.caSecretKey: could not read key %s of Secret %s in namespace %s. Helm reads it from the cluster when it installs or upgrades (helm template and client-side dry runs read no Secret): create the Secret first, or set snapshotMetadata.caCert to the CA's PEM instead" $sm.caSecretKey $sm.tlsSecretName .Release.Namespace) -}}
{{- end -}}
{{- $ca -}}
{{- end -}}
{{- end }}

{{/* Refuse snapshotMetadata values the sidecar or its clients could not work with, with
the reason. Renders nothing. */}}
{{- define "cairn.checkSnapshotMetadata" -}}
{{- $sm := .Values.snapshotMetadata -}}
{{- if $sm.enabled -}}
{{- if not $sm.tlsSecretName -}}
{{- fail (printf "snapshotMetadata.enabled needs snapshotMetadata.tlsSecretName: an existing kubernetes.io/tls Secret in namespace %s (keys tls.crt and tls.key) whose certificate names %s.%s; the sidecar serves TLS only (see values.yaml for cert-manager or openssl)" .Release.Namespace (include "cairn.snapshotMetadataService" .) .Release.Namespace) -}}
{{- end -}}
{{- if and (not $sm.caCert) (not $sm.caSecretKey) -}}
{{- fail "snapshotMetadata.enabled needs the CA that signed the sidecar's certificate, published in the SnapshotMetadataService for clients to verify it: set snapshotMetadata.caCert (its PEM, e.g. --set-file snapshotMetadata.caCert=ca.pem) or snapshotMetadata.caSecretKey (a key of the TLS Secret holding it, such as cert-manager's ca.crt)" -}}
{{- end -}}
{{- if and $sm.caCert $sm.caSecretKey -}}
{{- fail "snapshotMetadata: set caCert or caSecretKey, not both (which CA should clients trust?)" -}}
{{- end -}}
{{- $taken := dict (toString .Values.controller.grpcHealthPort) "controller.grpcHealthPort" -}}
{{- if .Values.sidecars.livenessProbe.enabled -}}
{{- $_ := set $taken (toString .Values.controller.healthPort) "controller.healthPort" -}}
{{- end -}}
{{- if .Values.metrics.enabled -}}
{{- $_ := set $taken (toString .Values.metrics.port.controller) "metrics.port.controller" -}}
{{- end -}}
{{- range $key := list "port" "healthPort" -}}
{{- $port := toString (index $sm $key) -}}
{{- if hasKey $taken $port -}}
{{- fail (printf "snapshotMetadata.%s: port %s is %s already, in the same pod; choose another" $key $port (get $taken $port)) -}}
{{- end -}}
{{- $_ := set $taken $port (printf "snapshotMetadata.%s" $key) -}}
{{- end -}}
{{- end -}}
{{- end }}

{{/* Names */}}
{{- define "drafthorse.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "drafthorse.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Labels: common, and the selector subset (add component with "drafthorse.componentSelector") */}}
{{- define "drafthorse.selectorLabels" -}}
app.kubernetes.io/name: {{ include "drafthorse.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "drafthorse.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "drafthorse.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Pod selector of this release's Ray pods (both RayClusters during a KubeRay upgrade), not Redis */}}
{{- define "drafthorse.rayPodSelector" -}}
matchLabels:
  {{- include "drafthorse.selectorLabels" . | nindent 2 }}
matchExpressions:
  - {key: app.kubernetes.io/component, operator: In, values: [head, gateway, draft, target]}
{{- end }}

{{- define "drafthorse.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Secrets: names and keys */}}
{{- define "drafthorse.authSecret" -}}
{{- default (printf "%s-auth" (include "drafthorse.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{- define "drafthorse.redisSecret" -}}
{{- if .Values.redis.enabled }}
{{- default (printf "%s-redis" (include "drafthorse.fullname" .)) .Values.redis.auth.existingSecret }}
{{- else }}
{{- .Values.redis.external.existingSecret }}
{{- end }}
{{- end }}

{{- define "drafthorse.redisSecretKey" -}}
{{- if .Values.redis.enabled }}{{ .Values.redis.auth.existingSecretKey }}{{ else }}{{ .Values.redis.external.existingSecretKey }}{{ end }}
{{- end }}

{{- define "drafthorse.redisHasPassword" -}}
{{- if .Values.redis.enabled }}{{ if .Values.redis.auth.enabled }}true{{ end }}{{ else if .Values.redis.external.existingSecret }}true{{ end }}
{{- end }}

{{/* The Redis URL, with $(REDIS_PASSWORD) expanded by the kubelet from the Secret-backed variable */}}
{{- define "drafthorse.redisUrl" -}}
{{- $auth := ternary ":$(REDIS_PASSWORD)@" "" (eq (include "drafthorse.redisHasPassword" .) "true") }}
{{- if .Values.redis.enabled }}
{{- printf "redis://%s%s-redis:6379/0" $auth (include "drafthorse.fullname" .) }}
{{- else }}
{{- $e := .Values.redis.external }}
{{- printf "%s://%s%s:%d/%d" (ternary "rediss" "redis" $e.tls) $auth $e.host (int $e.port) (int $e.db) }}
{{- end }}
{{- end }}

{{/* A secret value kept across upgrades: the live one if the Secret exists, else random */}}
{{- define "drafthorse.secretValue" -}}
{{- $existing := lookup "v1" "Secret" .ctx.Release.Namespace .name }}
{{- if and $existing (hasKey $existing.data .key) }}
{{- index $existing.data .key }}
{{- else }}
{{- randAlphaNum 40 | b64enc }}
{{- end }}
{{- end }}

{{/* Ray custom resources a pod offers: one replica's resources x replicasPerPod, as Ray wants them */}}
{{- define "drafthorse.podRayResources" -}}
{{- $out := dict }}
{{- range $k, $v := .resources }}
{{- $_ := set $out $k (mulf $v $.perPod) }}
{{- end }}
{{- $out | toJson | quote | squote }}
{{- end }}

{{/* Settings passed to the app builder (Serve config args): no secrets here */}}
{{- define "drafthorse.serveArgs" -}}
{{- $v := .Values }}
{{- $args := dict "model" $v.model.target "drafter" $v.model.drafter "dtype" $v.model.dtype "device" $v.model.device
    "host" "0.0.0.0" "gateway_port" (int $v.serve.gatewayPort) "metrics_port" (int $v.serve.metricsPort)
    "num_targets" (int $v.target.autoscaling.min_replicas)
    "num_drafts" (ternary (int $v.draft.autoscaling.min_replicas) 0 $v.draft.enabled) }}
{{- if $v.model.draft }}{{ $_ := set $args "draft_model" $v.model.draft }}{{ end }}
{{- if $v.apiKeys.allowAnonymous }}{{ $_ := set $args "allow_anonymous" true }}{{ end }}
{{- toJson (mergeOverwrite $args (deepCopy $v.settings)) }}
{{- end }}

{{- define "drafthorse.autoscaling" -}}
{{- toJson (mergeOverwrite (dict "policy" (dict "policy_function" "drafthorse.cluster.deployment.autoscaling:active_requests_policy")) (deepCopy .)) }}
{{- end }}

{{/* serveConfigV2: one application built by drafthorse.cluster.deployment.app:app_builder */}}
{{- define "drafthorse.serveConfig" -}}
{{- $v := .Values -}}
proxy_location: EveryNode
http_options:
  host: 0.0.0.0
  port: {{ int $v.serve.httpPort }}
applications:
  - name: {{ $v.serve.appName }}
    route_prefix: /
    import_path: {{ $v.serve.importPath }}
    args: {{ include "drafthorse.serveArgs" . }}
    deployments:
      - name: Gateway
        num_replicas: {{ int $v.gateway.replicas }}
        ray_actor_options: {{ toJson (dict "num_cpus" $v.gateway.numCpus "resources" $v.gateway.rayResources) }}
      - name: TargetWorker
        autoscaling_config: {{ include "drafthorse.autoscaling" $v.target.autoscaling }}
        ray_actor_options: {{ toJson (dict "num_cpus" $v.target.numCpus "num_gpus" $v.target.numGpus "resources" $v.target.rayResources) }}
      {{- if $v.draft.enabled }}
      - name: DraftWorker
        autoscaling_config: {{ include "drafthorse.autoscaling" $v.draft.autoscaling }}
        ray_actor_options: {{ toJson (dict "num_cpus" $v.draft.numCpus "num_gpus" $v.draft.numGpus "resources" $v.draft.rayResources) }}
      {{- end }}
{{- end }}

{{/* Env of every Ray container: the builder may run on any node, and reads these */}}
{{- define "drafthorse.env" -}}
- name: DRAFTHORSE_HOST
  value: "0.0.0.0"
- name: DRAFTHORSE_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "drafthorse.authSecret" . }}
      key: {{ .Values.auth.existingSecretKey }}
{{- if eq (include "drafthorse.redisHasPassword" .) "true" }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "drafthorse.redisSecret" . }}
      key: {{ include "drafthorse.redisSecretKey" . }}
{{- end }}
- name: DRAFTHORSE_REDIS_URL
  value: {{ include "drafthorse.redisUrl" . | quote }}
{{- if .Values.apiKeys.existingSecret }}
- name: DRAFTHORSE_API_KEY_HASHES
  valueFrom:
    secretKeyRef:
      name: {{ .Values.apiKeys.existingSecret }}
      key: {{ .Values.apiKeys.existingSecretKey }}
{{- end }}
{{- if .Values.internalTls.enabled }}
- name: DRAFTHORSE_TLS_CERT_FILE
  value: {{ printf "%s/tls.crt" (include "drafthorse.tlsMountPath" .) | quote }}
- name: DRAFTHORSE_TLS_KEY_FILE
  value: {{ printf "%s/tls.key" (include "drafthorse.tlsMountPath" .) | quote }}
- name: DRAFTHORSE_TLS_CA_FILE
  value: {{ printf "%s/ca.crt" (include "drafthorse.tlsMountPath" .) | quote }}
- name: DRAFTHORSE_TLS_SERVER_NAME
  value: {{ .Values.internalTls.serverName | quote }}
{{- end }}
- name: DRAFTHORSE_TARGET_RESOURCES
  value: {{ toJson .Values.target.rayResources | quote }}
- name: DRAFTHORSE_DRAFT_RESOURCES
  value: {{ toJson .Values.draft.rayResources | quote }}
- name: HF_HUB_OFFLINE
  value: "1"
- name: TRANSFORMERS_OFFLINE
  value: "1"
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Where the internal mTLS Secret (tls.crt, tls.key, ca.crt) is mounted in every Ray container */}}
{{- define "drafthorse.tlsMountPath" -}}
/etc/drafthorse/tls
{{- end }}

{{/* Volumes every Ray pod gets: shared memory for Ray's object store, the model volume, and the
internal mTLS Secret */}}
{{- define "drafthorse.volumes" -}}
- name: dshm
  emptyDir:
    medium: Memory
{{- if .Values.models.volume }}
- name: models
  {{- toYaml .Values.models.volume | nindent 2 }}
{{- end }}
{{- if .Values.internalTls.enabled }}
- name: internal-tls
  secret:
    secretName: {{ .Values.internalTls.existingSecret }}
    {{- if .Values.podSecurityContext.fsGroup }}
    defaultMode: 0440     # the key readable by the pod's fsGroup only
    {{- end }}
{{- end }}
{{- end }}

{{- define "drafthorse.volumeMounts" -}}
- name: dshm
  mountPath: /dev/shm
{{- if .Values.models.volume }}
- name: models
  mountPath: {{ .Values.models.mountPath }}
  readOnly: true
{{- end }}
{{- if .Values.internalTls.enabled }}
- name: internal-tls
  mountPath: {{ include "drafthorse.tlsMountPath" . }}
  readOnly: true
{{- end }}
{{- end }}

{{/* Pod spec fields every Ray pod shares */}}
{{- define "drafthorse.podCommon" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
# Serve drains a stopping replica for up to settings.grace_s + 5 s (graceful_shutdown_timeout_s):
# the kubelet must not SIGKILL the pod before that
terminationGracePeriodSeconds: {{ int .Values.gracefulShutdownSeconds }}
volumes:
  {{- include "drafthorse.volumes" . | nindent 2 }}
{{- end }}

{{/* Every Ray worker pod's preStop hook: Ray drains the pod's node, Serve moves its replicas to other
nodes (each one finishing or handing over its streams), and the hook returns once none is left there,
so the pod's SIGTERM no longer interrupts a stream. Its deadline leaves the kubelet 5 s. */}}
{{- define "drafthorse.preStop" -}}
lifecycle:
  preStop:
    exec:
      command: ["drafthorse", "drain-node", "--deadline-s", "{{ sub (int .Values.gracefulShutdownSeconds) 5 }}"]
{{- end }}

{{/* Checks JSON schema cannot express */}}
{{- define "drafthorse.validate" -}}
{{- range $g := list "draft" "target" }}
{{- $w := index $.Values $g }}
{{- if gt (int $w.minReplicas) (int $w.maxReplicas) }}
{{- fail (printf "%s.minReplicas (%d) must not exceed %s.maxReplicas (%d)" $g (int $w.minReplicas) $g (int $w.maxReplicas)) }}
{{- end }}
{{- if gt (int $w.autoscaling.min_replicas) (int $w.autoscaling.max_replicas) }}
{{- fail (printf "%s.autoscaling.min_replicas (%d) must not exceed %s.autoscaling.max_replicas (%d)" $g (int $w.autoscaling.min_replicas) $g (int $w.autoscaling.max_replicas)) }}
{{- end }}
{{- if gt (int $w.autoscaling.max_replicas) (mul (int $w.maxReplicas) (int $w.replicasPerPod)) }}
{{- fail (printf "%s.autoscaling.max_replicas (%d) needs more pods than %s.maxReplicas x replicasPerPod (%d) allow" $g (int $w.autoscaling.max_replicas) $g (mul (int $w.maxReplicas) (int $w.replicasPerPod))) }}
{{- end }}
{{- end }}
{{- range $k := list "tls_cert_file" "tls_key_file" "tls_ca_file" "tls_server_name" }}
{{- if hasKey $.Values.settings $k }}
{{- fail (printf "settings.%s: the internal mTLS is configured with internalTls (enabled, existingSecret, serverName)" $k) }}
{{- end }}
{{- end }}
{{- if and .Values.internalTls.enabled (not .Values.internalTls.existingSecret) }}
{{- fail "internalTls.enabled is true: set internalTls.existingSecret (a Secret with tls.crt, tls.key and ca.crt, e.g. made by a cert-manager Certificate)" }}
{{- end }}
{{- $grace := 5.0 }}{{/* Settings.grace_s's default */}}
{{- if hasKey .Values.settings "grace_s" }}{{ $grace = float64 .Values.settings.grace_s }}{{ end }}
{{- if le (float64 .Values.gracefulShutdownSeconds) (addf $grace 10) }}
{{- fail (printf "gracefulShutdownSeconds (%v) must exceed settings.grace_s + 10 (%v): Serve drains a stopping replica for up to grace_s + 5 s, and the pod must outlive that" .Values.gracefulShutdownSeconds (addf $grace 10)) }}
{{- end }}
{{- range $k := list "auth_token" "redis_url" }}
{{- if hasKey $.Values.settings $k }}
{{- fail (printf "settings.%s: secrets do not belong in values (the Serve config is stored in plain text); use auth.existingSecret / redis.*.existingSecret" $k) }}
{{- end }}
{{- end }}
{{- if and (not .Values.redis.enabled) (not .Values.redis.external.host) }}
{{- fail "redis.enabled is false: set redis.external.host (the chart has no Redis to use otherwise)" }}
{{- end }}
{{- if and (eq .Values.model.drafter "draft-model") (not .Values.model.draft) }}
{{- fail "model.drafter is draft-model: set model.draft (the draft model's path)" }}
{{- end }}
{{- if and (eq .Values.model.drafter "draft-model") (not .Values.draft.enabled) }}
{{- fail "model.drafter is draft-model: draft.enabled must be true" }}
{{- end }}
{{- if and .Values.networkPolicy.enabled (not .Values.networkPolicy.operatorNamespace) }}
{{- fail "networkPolicy.operatorNamespace is empty: set the namespace the KubeRay operator runs in (the only peer admitted to the Ray dashboard, which runs code; pod labels alone can be carried by any pod in any namespace)" }}
{{- end }}
{{- if and (not .Values.apiKeys.existingSecret) (not .Values.apiKeys.allowAnonymous) }}
{{- fail "apiKeys.existingSecret is empty: the public APIs would be open to whoever reaches the Services. Set it (a Secret holding a JSON list of sha256 digests; `drafthorse api-key` makes one) or set apiKeys.allowAnonymous=true explicitly" }}
{{- end }}
{{- end }}

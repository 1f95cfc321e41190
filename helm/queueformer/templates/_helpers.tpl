{{/* ---------------------------------------------------------------------------------------------
Names and labels
--------------------------------------------------------------------------------------------- */}}

{{- define "queueformer.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* <release>-<chart>, or the release name alone when it already contains the chart name. */}}
{{- define "queueformer.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "queueformer.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "queueformer.selectorLabels" -}}
app.kubernetes.io/name: {{ include "queueformer.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "queueformer.labels" -}}
helm.sh/chart: {{ include "queueformer.chart" . }}
{{ include "queueformer.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: queueformer
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Labels of one component: (dict "ctx" $ "component" "api") */}}
{{- define "queueformer.componentLabels" -}}
{{ include "queueformer.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "queueformer.componentSelector" -}}
{{ include "queueformer.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "queueformer.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "queueformer.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* ---------------------------------------------------------------------------------------------
Images
--------------------------------------------------------------------------------------------- */}}

{{/* (dict "ctx" $ "repository" "queueformer-api") -> registry/repository:tag */}}
{{- define "queueformer.image" -}}
{{- $tag := .ctx.Values.image.tag | default .ctx.Chart.AppVersion -}}
{{- if .ctx.Values.image.registry -}}
{{- printf "%s/%s:%s" (trimSuffix "/" .ctx.Values.image.registry) .repository $tag -}}
{{- else -}}
{{- printf "%s:%s" .repository $tag -}}
{{- end -}}
{{- end -}}

{{/* A worker set's image: its own `image`, else the CUDA image when it asks for GPUs, else the CPU one. */}}
{{- define "queueformer.workerImage" -}}
{{- if .set.image -}}
{{- .set.image -}}
{{- else if gt (int .set.gpu) 0 -}}
{{- include "queueformer.image" (dict "ctx" .ctx "repository" .ctx.Values.image.worker) -}}
{{- else -}}
{{- include "queueformer.image" (dict "ctx" .ctx "repository" .ctx.Values.image.workerCpu) -}}
{{- end -}}
{{- end -}}

{{/* ---------------------------------------------------------------------------------------------
Worker sets
--------------------------------------------------------------------------------------------- */}}

{{/*
One worker set with `workers.defaults` filled in, as YAML: (dict "ctx" $ "set" $set).
A key the set gives replaces the default's key entirely (so `gpu: 0` or `enabled: false` win); the
`keda` map is merged key by key.
*/}}
{{- define "queueformer.workerSet" -}}
{{- $merged := deepCopy .ctx.Values.workers.defaults -}}
{{- range $key, $value := .set -}}
{{- if ne $key "keda" -}}
{{- $_ := set $merged $key $value -}}
{{- end -}}
{{- end -}}
{{- $keda := deepCopy (.ctx.Values.workers.defaults.keda | default dict) -}}
{{- range $key, $value := (.set.keda | default dict) -}}
{{- $_ := set $keda $key $value -}}
{{- end -}}
{{- $_ := set $merged "keda" $keda -}}
{{- toYaml $merged -}}
{{- end -}}

{{/* Does some worker set scale with KEDA? ("true" or "") */}}
{{- define "queueformer.anyKeda" -}}
{{- range .Values.workers.sets -}}
{{- if (include "queueformer.workerSet" (dict "ctx" $ "set" .) | fromYaml).keda.enabled -}}true{{- end -}}
{{- end -}}
{{- end -}}

{{- define "queueformer.workerName" -}}
{{- printf "%s-worker-%s" (include "queueformer.fullname" .ctx) .set.name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Does some worker set serve the `echo` queue? ("true" or "") */}}
{{- define "queueformer.servesEcho" -}}
{{- range .Values.workers.sets -}}
{{- if has "echo" .queues -}}true{{- end -}}
{{- end -}}
{{- end -}}

{{/* ---------------------------------------------------------------------------------------------
Registry
--------------------------------------------------------------------------------------------- */}}

{{/* The custom registry as a dict ({models: ..., fine_tune: ...}) or an empty dict when the bundled one is used. */}}
{{- define "queueformer.customRegistry" -}}
{{- $models := deepCopy (.Values.registry.models | default dict) -}}
{{- range .Values.workers.sets -}}
{{- $set := . -}}
{{- range $name, $entry := ($set.models | default dict) -}}
{{- if hasKey $models $name -}}
{{- fail (printf "model %q is defined twice (registry.models or another worker set's models, and set %q)" $name $set.name) -}}
{{- end -}}
{{- $_ := set $models $name $entry -}}
{{- end -}}
{{- end -}}
{{- if $models -}}
{{- toYaml (dict "models" $models "fine_tune" .Values.registry.fineTune) -}}
{{- end -}}
{{- end -}}

{{/* The queues of the custom registry: each model's `queue` (default: its name) plus the fine-tune queues. */}}
{{- define "queueformer.registryQueues" -}}
{{- $registry := include "queueformer.customRegistry" . | fromYaml -}}
{{- $queues := list .Values.registry.fineTune.queue (index .Values.registry.fineTune "serve_queue") -}}
{{- range $name, $entry := $registry.models -}}
{{- $queues = append $queues (($entry | default dict).queue | default (regexReplaceAll "[/:]" $name "-")) -}}
{{- end -}}
{{- toJson $queues -}}
{{- end -}}

{{- define "queueformer.registryPath" -}}/etc/queueformer/registry.yaml{{- end -}}

{{/* ---------------------------------------------------------------------------------------------
Redis and secrets
--------------------------------------------------------------------------------------------- */}}

{{- define "queueformer.redisHost" -}}
{{- printf "%s-redis" (include "queueformer.fullname" .) -}}
{{- end -}}

{{/*
The chart's own Secrets, one per consumer, so that each pod references only what it uses:
  <fullname>-redis   redis-password (in-cluster Valkey) or redis-url (externalRedis.url): every pod
  <fullname>-api     bootstrap-keys, webhook-secret: the API (and the `helm test` pod's key) only
  <fullname>-flower  basic-auth, password: Flower only
Workers get the Redis URL, the S3 keys and the hub token; never the API keys or the webhook secret.
*/}}
{{- define "queueformer.redisSecretName" -}}
{{- printf "%s-redis" (include "queueformer.fullname" .) -}}
{{- end -}}

{{- define "queueformer.apiSecretName" -}}
{{- printf "%s-api" (include "queueformer.fullname" .) -}}
{{- end -}}

{{- define "queueformer.flowerOwnSecretName" -}}
{{- printf "%s-flower" (include "queueformer.fullname" .) -}}
{{- end -}}

{{/* With an external Redis: the Secret (name, key) holding its URL. */}}
{{- define "queueformer.redisUrlSecretName" -}}
{{- .Values.externalRedis.existingSecret | default (include "queueformer.redisSecretName" .) -}}
{{- end -}}

{{- define "queueformer.redisUrlSecretKey" -}}
{{- if .Values.externalRedis.existingSecret -}}
{{- .Values.externalRedis.existingSecretKey -}}
{{- else -}}
redis-url
{{- end -}}
{{- end -}}

{{- define "queueformer.redisPasswordSecretName" -}}
{{- .Values.redis.auth.existingSecret | default (include "queueformer.redisSecretName" .) -}}
{{- end -}}

{{- define "queueformer.redisPasswordSecretKey" -}}
{{- if .Values.redis.auth.existingSecret -}}
{{- .Values.redis.auth.existingSecretKey -}}
{{- else -}}
redis-password
{{- end -}}
{{- end -}}

{{- define "queueformer.authSecretName" -}}
{{- .Values.auth.existingSecret | default (include "queueformer.apiSecretName" .) -}}
{{- end -}}

{{- define "queueformer.flowerSecretName" -}}
{{- .Values.flower.auth.existingSecret | default (include "queueformer.flowerOwnSecretName" .) -}}
{{- end -}}

{{- define "queueformer.flowerSecretKey" -}}
{{- if .Values.flower.auth.existingSecret -}}
{{- .Values.flower.auth.existingSecretKey -}}
{{- else -}}
basic-auth
{{- end -}}
{{- end -}}

{{/*
A value the cluster already holds, so that upgrades keep generated secrets:
(dict "ctx" $ "secret" "<name>" "key" "<key>" "legacyKey" "<key>"). It reads the chart's Secret of
that name, then the single `<fullname>` Secret that chart versions before the split used (under
legacyKey), and returns "" when neither has it (a first install, or `helm template`).
*/}}
{{- define "queueformer.existingSecretValue" -}}
{{- $data := (lookup "v1" "Secret" .ctx.Release.Namespace .secret).data | default dict -}}
{{- if hasKey $data .key -}}
{{- index $data .key | b64dec -}}
{{- else -}}
{{- $legacy := (lookup "v1" "Secret" .ctx.Release.Namespace (include "queueformer.fullname" .ctx)).data | default dict -}}
{{- if hasKey $legacy .legacyKey -}}
{{- index $legacy .legacyKey | b64dec -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
A checksum of the values that end up in the Secrets one component reads: (dict "ctx" $ "component"
"api"). Generated passwords are not part of it: they are random only on the first install and reused
afterwards, and hashing a fresh random value would restart every pod on the first upgrade. A change
to the API keys rolls the API, not the workers.
*/}}
{{- define "queueformer.secretChecksum" -}}
{{- $v := .ctx.Values -}}
{{- $parts := list $v.redis.auth $v.externalRedis -}}
{{- if eq .component "api" -}}
{{- $parts = concat $parts (list $v.auth $v.storage.s3) -}}
{{- else if eq .component "worker" -}}
{{- $parts = concat $parts (list $v.storage.s3 $v.huggingface) -}}
{{- else if eq .component "flower" -}}
{{- $parts = append $parts $v.flower.auth -}}
{{- end -}}
{{- toJson $parts | sha256sum -}}
{{- end -}}

{{/* Env: QUEUEFORMER_REDIS_URL, which every queueformer pod needs. */}}
{{- define "queueformer.redisEnv" -}}
{{- if .Values.redis.enabled -}}
# The in-cluster Redis' URL is put together in the pod ($(REDIS_PASSWORD) expands the variable
# defined just before it), so the password lives in one Secret key, generated or from
# redis.auth.existingSecret, and every URL carries it.
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "queueformer.redisPasswordSecretName" . }}
      key: {{ include "queueformer.redisPasswordSecretKey" . }}
- name: QUEUEFORMER_REDIS_URL
  value: "redis://:$(REDIS_PASSWORD)@{{ include "queueformer.redisHost" . }}:6379/0"
{{- else -}}
- name: QUEUEFORMER_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "queueformer.redisUrlSecretName" . }}
      key: {{ include "queueformer.redisUrlSecretKey" . }}
{{- end }}
{{- end -}}

{{/* Env: the S3 keys (API and workers), when storage.s3.existingSecret names them. */}}
{{- define "queueformer.storageEnv" -}}
{{- if .Values.storage.s3.existingSecret -}}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ .Values.storage.s3.existingSecret }}
      key: {{ .Values.storage.s3.accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.storage.s3.existingSecret }}
      key: {{ .Values.storage.s3.secretAccessKeyKey }}
{{- end }}
{{- end -}}

{{/* ---------------------------------------------------------------------------------------------
Storage
--------------------------------------------------------------------------------------------- */}}

{{/* "true" when files live on the shared volume rather than in object storage. */}}
{{- define "queueformer.fileStorage" -}}
{{- if or (not .Values.storage.url) (hasPrefix "file://" .Values.storage.url) -}}true{{- end -}}
{{- end -}}

{{- define "queueformer.storageClaim" -}}
{{- .Values.storage.persistence.existingClaim | default (printf "%s-storage" (include "queueformer.fullname" .)) -}}
{{- end -}}

{{- define "queueformer.storageVolume" -}}
{{- if include "queueformer.fileStorage" . -}}
- name: storage
{{- if .Values.storage.persistence.enabled }}
  persistentVolumeClaim:
    claimName: {{ include "queueformer.storageClaim" . }}
{{- else }}
  emptyDir: {}
{{- end }}
{{- end }}
{{- end -}}

{{- define "queueformer.storageMount" -}}
{{- if include "queueformer.fileStorage" . -}}
- name: storage
  mountPath: /data/storage
{{- end }}
{{- end -}}

{{/* Pod annotations of the API and worker pods: config and secret checksums roll pods on change.
(dict "ctx" $ "component" "api") */}}
{{- define "queueformer.checksums" -}}
checksum/config: {{ include (print .ctx.Template.BasePath "/configmap.yaml") .ctx | sha256sum }}
checksum/registry: {{ include (print .ctx.Template.BasePath "/registry-configmap.yaml") .ctx | sha256sum }}
checksum/secret: {{ include "queueformer.secretChecksum" . }}
{{- end -}}

{{/* Validations that need more than the JSON schema. Rendered once, from the ConfigMap. */}}
{{- define "queueformer.validate" -}}
{{- if and (not .Values.redis.enabled) (not .Values.externalRedis.url) (not .Values.externalRedis.existingSecret) -}}
{{- fail "redis.enabled is false: set externalRedis.existingSecret (preferred) or externalRedis.url" -}}
{{- end -}}
{{- $names := dict -}}
{{- range .Values.workers.sets -}}
{{- if hasKey $names .name -}}
{{- fail (printf "workers.sets: the name %q is used twice" .name) -}}
{{- end -}}
{{- $_ := set $names .name true -}}
{{- end -}}
{{- if include "queueformer.customRegistry" . -}}
{{- $known := include "queueformer.registryQueues" . | fromJsonArray -}}
{{- range .Values.workers.sets -}}
{{- $set := . -}}
{{- range .queues -}}
{{- if not (has . $known) -}}
{{- fail (printf "workers.sets[%s]: queue %q is not in the registry (queues: %s)" $set.name . (join ", " (uniq $known))) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- range .Values.workers.sets -}}
{{- $set := include "queueformer.workerSet" (dict "ctx" $ "set" .) | fromYaml -}}
{{- if and $set.keda.enabled (not $.Values.redis.enabled) (not $.Values.keda.redisAddress) -}}
{{- fail (printf "workers.sets[%s]: KEDA with an external Redis needs keda.redisAddress (host:port)" $set.name) -}}
{{- end -}}
{{- end -}}
{{- end -}}

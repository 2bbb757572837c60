{{/* Names. With release name "agentmesh" everything is called agentmesh-*. */}}
{{- define "agentmesh.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "agentmesh.fullname" -}}
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

{{- define "agentmesh.labels" -}}
app.kubernetes.io/name: {{ include "agentmesh.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* Selector labels of one component: include with (list $ "server"). */}}
{{- define "agentmesh.selector" -}}
{{- $ := index . 0 -}}
app.kubernetes.io/name: {{ include "agentmesh.name" $ }}
app.kubernetes.io/instance: {{ $.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "agentmesh.serviceAccountName" -}}
{{- default (include "agentmesh.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "agentmesh.serverImage" -}}
{{- printf "%s:%s" .Values.image.server.repository (default .Chart.AppVersion .Values.image.server.tag) -}}
{{- end -}}

{{- define "agentmesh.sidecarImage" -}}
{{- printf "%s:%s" .Values.image.sidecar.repository (default .Chart.AppVersion .Values.image.sidecar.tag) -}}
{{- end -}}

{{- define "agentmesh.configName" -}}{{ include "agentmesh.fullname" . }}-config{{- end -}}
{{- define "agentmesh.keysName" -}}
{{- default (printf "%s-agent-keys" (include "agentmesh.fullname" .)) .Values.ledger.existingSecret -}}
{{- end -}}
{{- define "agentmesh.secretsName" -}}
{{- default (printf "%s-secrets" (include "agentmesh.fullname" .)) .Values.secrets.existingSecret -}}
{{- end -}}
{{- define "agentmesh.postgresqlName" -}}{{ include "agentmesh.fullname" . }}-postgresql{{- end -}}
{{- define "agentmesh.redisName" -}}{{ include "agentmesh.fullname" . }}-redis{{- end -}}
{{- define "agentmesh.injectorName" -}}{{ include "agentmesh.fullname" . }}-injector{{- end -}}

{{- define "agentmesh.redisHost" -}}
{{- if .Values.redis.enabled -}}
{{- printf "%s-master" (include "agentmesh.redisName" .) -}}
{{- else -}}
{{- .Values.externalRedis.host -}}
{{- end -}}
{{- end -}}

{{- define "agentmesh.redisPort" -}}
{{- if .Values.redis.enabled }}{{ .Values.redis.port }}{{ else }}{{ .Values.externalRedis.port }}{{ end -}}
{{- end -}}

{{/* The pod-level security context every AgentMesh pod runs with. */}}
{{- define "agentmesh.podSecurityContext" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: 1000
  fsGroup: 1000
  seccompProfile:
    type: RuntimeDefault
{{- end -}}

{{- define "agentmesh.containerSecurityContext" -}}
securityContext:
  capabilities:
    drop: ["ALL"]
  readOnlyRootFilesystem: true
  allowPrivilegeEscalation: false
{{- end -}}

{{- define "agentmesh.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets -}}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end -}}
{{- end -}}

{{/* env entries for secretKeyRefs: include with (list $ "NAME" "secret" "key"). */}}
{{- define "agentmesh.secretEnv" -}}
- name: {{ index . 1 }}
  valueFrom:
    secretKeyRef:
      name: {{ index . 2 }}
      key: {{ index . 3 }}
{{- end -}}

{{/* Sanity checks that values.schema.json cannot express. */}}
{{- define "agentmesh.validate" -}}
{{- if and (not .Values.postgresql.enabled) (not .Values.externalDatabase.url) (not .Values.secrets.existingSecret) -}}
{{- fail "postgresql.enabled=false needs externalDatabase.url or secrets.existingSecret (with database-url)" -}}
{{- end -}}
{{- if and (eq .Values.storage.backend "redis") (not .Values.redis.enabled) (not .Values.externalRedis.host) -}}
{{- fail "storage.backend=redis with redis.enabled=false needs externalRedis.host" -}}
{{- end -}}
{{- end -}}

// Drives two real FHIR JS clients against a running fedgate: fhir-kit-client and SMART's fhirclient.
// Env: FHIR_BASE, TOKEN (a writer's bearer token), SMART_TOKEN (a token with SMART scopes only), PATIENT,
// OBSERVATION (an Observation of PATIENT), N_OBS (Observations in PATIENT's compartment), PATIENT_TOKEN (a
// SMART patient/*.read token whose launch context is PATIENT), OTHER (another patient).
// Prints one JSON line per step; exits non-zero on the first failed expectation.
import { createRequire } from 'node:module';
import { Client } from 'fhir-kit-client';

const require = createRequire(import.meta.url);
const smart = require('fhirclient');
const { fetchWellKnownJson } = require('fhirclient/lib/smart');

const { FHIR_BASE, TOKEN, SMART_TOKEN, PATIENT, OBSERVATION, PATIENT_TOKEN, OTHER } = process.env;
const N_OBS = Number(process.env.N_OBS);

function check(cond, what, detail) {
  if (!cond) {
    console.error(`FAILED: ${what}: ${JSON.stringify(detail).slice(0, 2000)}`);
    process.exit(1);
  }
  console.log(JSON.stringify({ ok: what }));
}

const resources = (bundle) => (bundle.entry || []).map((e) => e.resource);

// ---- fhir-kit-client
const fkc = new Client({ baseUrl: FHIR_BASE, bearerToken: TOKEN });
let b = await fkc.compartmentSearch({ resourceType: 'Observation', compartment: { resourceType: 'Patient', id: PATIENT } });
check(b.resourceType === 'Bundle' && resources(b).length === N_OBS
      && resources(b).every((r) => r.resourceType === 'Observation' && r.subject.reference === `Patient/${PATIENT}`),
      'fhir-kit-client compartmentSearch', b);
b = await fkc.systemSearch({ searchParams: { _type: 'Patient,Observation', _id: `${PATIENT},${OBSERVATION}` } });
check(resources(b).map((r) => `${r.resourceType}/${r.id}`).sort().join(' ')
      === `Observation/${OBSERVATION} Patient/${PATIENT}`, 'fhir-kit-client systemSearch', b);
const before = await fkc.read({ resourceType: 'Observation', id: OBSERVATION });
let p = await fkc.patch({
  resourceType: 'Observation', id: OBSERVATION,
  jsonPatch: [{ op: 'replace', path: '/valueQuantity/value', value: 101 }],
  options: { headers: { 'If-Match': `W/"${before.meta.versionId}"` } },
});
check(p.valueQuantity.value === 101 && Number(p.meta.versionId) === Number(before.meta.versionId) + 1,
      'fhir-kit-client patch', p);
let stale = null;
try {
  await fkc.patch({ resourceType: 'Observation', id: OBSERVATION, jsonPatch: [{ op: 'remove', path: '/note' }],
                    options: { headers: { 'If-Match': `W/"${before.meta.versionId}"` } } });
} catch (err) { stale = err.response && err.response.status; }
check(stale === 412, 'fhir-kit-client patch with a stale If-Match is refused', stale);
b = await fkc.operation({ name: '$everything', resourceType: 'Patient', id: PATIENT, method: 'GET' });
check(resources(b).some((r) => r.resourceType === 'Patient' && r.id === PATIENT)
      && resources(b).filter((r) => r.resourceType === 'Observation').length === N_OBS,
      'fhir-kit-client $everything', b);

// ---- SMART's fhirclient
const conf = await fetchWellKnownJson(FHIR_BASE);
check(conf.capabilities.includes('permission-v2') && conf.scopes_supported.includes('user/*.cruds'),
      'fhirclient .well-known/smart-configuration', conf);
const client = smart({ headers: { host: 'localhost' }, url: '/' }, {})
  .client({ serverUrl: FHIR_BASE, tokenResponse: { access_token: SMART_TOKEN, scope: 'user/*.cruds', patient: PATIENT } });
b = await client.request(`Patient/${PATIENT}/Observation`);
check(resources(b).length === N_OBS, 'fhirclient compartment search', b);
b = await client.request(`${FHIR_BASE}?_type=Patient,Observation&_id=${PATIENT},${OBSERVATION}`);
check(resources(b).length === 2, 'fhirclient system search', b);
const cur = await client.request(`Observation/${OBSERVATION}`);
p = await client.patch(`Observation/${OBSERVATION}`, [{ op: 'add', path: '/note', value: [{ text: 'via SMART' }] }],
                       { headers: { 'If-Match': `W/"${cur.meta.versionId}"` } });
check(p.note[0].text === 'via SMART' && p.valueQuantity.value === 101, 'fhirclient patch', p);
b = await client.request(`Patient/${client.getPatientId()}/$everything`);
check(resources(b).filter((r) => r.resourceType === 'Observation').length === N_OBS, 'fhirclient $everything', b);

// ---- a patient-scoped SMART app (patient/*.read, launch context PATIENT): that patient's data only, no writes
const app = smart({ headers: { host: 'localhost' }, url: '/' }, {})
  .client({ serverUrl: FHIR_BASE, tokenResponse: { access_token: PATIENT_TOKEN, scope: 'launch/patient patient/*.read',
                                                    patient: PATIENT } });
const me = await app.patient.read();
check(me.resourceType === 'Patient' && me.id === PATIENT, 'fhirclient patient scope: patient.read', me);
b = await app.patient.request('Observation');
check(resources(b).length === N_OBS && resources(b).every((r) => r.subject.reference === `Patient/${PATIENT}`),
      'fhirclient patient scope: the patient\'s Observations', b);
b = await app.request('Observation?_count=100');
check(resources(b).every((r) => r.subject.reference === `Patient/${PATIENT}`),
      'fhirclient patient scope: a search without the patient still returns only theirs', b);
let refused = null;
try { await app.request(`Patient/${OTHER}`); } catch (err) { refused = err.status || (err.response && err.response.status); }
check(refused === 404, 'fhirclient patient scope: another patient is not there', refused);
refused = null;
try {
  await app.patch(`Observation/${OBSERVATION}`, [{ op: 'remove', path: '/note' }]);
} catch (err) { refused = err.status || (err.response && err.response.status); }
check(refused === 403, 'fhirclient patient scope: writes refused', refused);
const fkcPatient = new Client({ baseUrl: FHIR_BASE, bearerToken: PATIENT_TOKEN });
b = await fkcPatient.operation({ name: '$everything', resourceType: 'Patient', id: PATIENT, method: 'GET' });
check(resources(b).filter((r) => r.resourceType === 'Observation').length === N_OBS,
      'fhir-kit-client patient scope: $everything', b);
console.log(JSON.stringify({ done: true }));

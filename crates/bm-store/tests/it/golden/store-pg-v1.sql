--
-- PostgreSQL database dump
--

\restrict FQgEKKv2Ms2BrJ64vvhGOSvSice8pCTWp9hWoQhieV9hKczoCIvEYdCdht6cQu0

-- Dumped from database version 15.18 (Debian 15.18-0+deb12u1)
-- Dumped by pg_dump version 15.18 (Debian 15.18-0+deb12u1)

SET statement_timeout = 0;
SET lock_timeout = 0;
SET idle_in_transaction_session_timeout = 0;
SET client_encoding = 'UTF8';
SET standard_conforming_strings = on;
SELECT pg_catalog.set_config('search_path', '', false);
SET check_function_bodies = false;
SET xmloption = content;
SET client_min_messages = warning;
SET row_security = off;

SET default_tablespace = '';

SET default_table_access_method = heap;

--
-- Name: counters; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.counters (
    name text NOT NULL,
    value bigint NOT NULL
);


--
-- Name: events; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.events (
    revision bigint NOT NULL,
    operation_id text NOT NULL,
    machine_id text NOT NULL,
    "time" bigint NOT NULL,
    operation_type text NOT NULL,
    kind text NOT NULL,
    phase text NOT NULL,
    stage text NOT NULL,
    attempt bigint NOT NULL,
    message text NOT NULL
);


--
-- Name: logs; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.logs (
    operation_id text NOT NULL,
    sequence bigint NOT NULL,
    "time" bigint NOT NULL,
    stage text NOT NULL,
    tag text NOT NULL,
    message text NOT NULL,
    log_revision bigint NOT NULL
);


--
-- Name: machine_macs; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.machine_macs (
    mac text NOT NULL,
    machine_id text NOT NULL
);


--
-- Name: machines; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.machines (
    id text NOT NULL,
    phase text NOT NULL,
    effective_state text NOT NULL,
    doc text NOT NULL,
    doc_crc32 bigint
);


--
-- Name: operations; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.operations (
    id text NOT NULL,
    machine_id text NOT NULL,
    type text NOT NULL,
    phase text NOT NULL,
    request_id text NOT NULL,
    cancel_requested boolean DEFAULT false NOT NULL,
    lease_owner text,
    lease_expires bigint,
    lease_generation bigint DEFAULT 0 NOT NULL,
    doc text NOT NULL,
    doc_crc32 bigint
);


--
-- Name: schema_version; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.schema_version (
    version bigint NOT NULL
);


--
-- Data for Name: counters; Type: TABLE DATA; Schema: public; Owner: -
--

COPY public.counters (name, value) FROM stdin;
events	10
logs	6
\.


--
-- Data for Name: events; Type: TABLE DATA; Schema: public; Owner: -
--

COPY public.events (revision, operation_id, machine_id, "time", operation_type, kind, phase, stage, attempt, message) FROM stdin;
1	op-01MCC5RM0A000000000000000A	machine-1	1800000010000000	REIMAGE	CREATED	PENDING		0	
2	op-01MCC5RM0A000000000000000A	machine-1	1800000012000000	REIMAGE	STAGE_STARTED	RUNNING	set-netboot	1	
3	op-01MCC5RM0A000000000000000A	machine-1	1800000014000000	REIMAGE	STAGE_STARTED	RUNNING	power-cycle	1	
4	op-01MCC5RM0A000000000000000A	machine-1	1800000016000000	REIMAGE	STAGE_STARTED	RUNNING	repave	1	
5	op-01MCC5RM0A000000000000000A	machine-1	1800000017000000	REIMAGE	STAGE_SUCCEEDED	RUNNING	repave	1	
6	op-01MCC5RM0A000000000000000A	machine-1	1800000018000000	REIMAGE	PHASE_CHANGED	SUCCEEDED		0	
7	op-01MCC5RM0M000000000000000M	machine-2	1800000020000000	REBOOT	CREATED	PENDING		0	
8	op-01MCC5RM0Y000000000000000Y	machine-1	1800000030000000	REBOOT	CREATED	PENDING		0	
9	op-01MCC5RM0Y000000000000000Y	machine-1	1800000031000000	REBOOT	CANCEL_REQUESTED	PENDING		0	
10	op-01MCC5RM0Y000000000000000Y	machine-1	1800000031000000	REBOOT	PHASE_CHANGED	CANCELED		0	canceled by an operator before its first stage
\.


--
-- Data for Name: logs; Type: TABLE DATA; Schema: public; Owner: -
--

COPY public.logs (operation_id, sequence, "time", stage, tag, message, log_revision) FROM stdin;
op-01MCC5RM0A000000000000000A	1	1800000012000000	set-netboot	fake	set-netboot step 0	1
op-01MCC5RM0A000000000000000A	2	1800000012000000	set-netboot	fake	set-netboot step 1	2
op-01MCC5RM0A000000000000000A	3	1800000014000000	power-cycle	fake	power-cycle step 0	3
op-01MCC5RM0A000000000000000A	4	1800000014000000	power-cycle	fake	power-cycle step 1	4
op-01MCC5RM0A000000000000000A	5	1800000016000000	repave	fake	repave step 0	5
op-01MCC5RM0A000000000000000A	6	1800000016000000	repave	fake	repave step 1	6
\.


--
-- Data for Name: machine_macs; Type: TABLE DATA; Schema: public; Owner: -
--

COPY public.machine_macs (mac, machine_id) FROM stdin;
02:00:00:00:00:01	machine-1
02:00:00:00:00:02	machine-2
02:00:00:00:00:03	machine-3
02:00:00:00:00:04	machine-4
\.


--
-- Data for Name: machines; Type: TABLE DATA; Schema: public; Owner: -
--

COPY public.machines (id, phase, effective_state, doc, doc_crc32) FROM stdin;
machine-1	MAINTENANCE	MAINTENANCE_IDLE	{"id":"machine-1","spec":{"provider":"fake","mac_addresses":["02:00:00:00:00:01"],"ssh_endpoint":"root@10.0.0.1:22","bmc_endpoint":"","image":"ubuntu-24.04","target_cluster":"prod","network_config":""},"labels":{"rack":"r1","zone":"a"},"status":{"phase":"MAINTENANCE","conditions":[{"type":"InCustomerCluster","status":true,"reason":"JoinedCluster","message":"node of cluster prod since op-01MCC5RM0A000000000000000A","last_transition_time":1800000018000000},{"type":"Provisioned","status":true,"reason":"Reimaged","message":"image ubuntu-24.04 written by op-01MCC5RM0A000000000000000A","last_transition_time":1800000018000000},{"type":"OperationCanceled","status":true,"reason":"Canceled","message":"REBOOT op-01MCC5RM0Y000000000000000Y was canceled before its first stage","last_transition_time":1800000031000000},{"type":"Reachable","status":true,"reason":"Reimaged","message":"verified by op-01MCC5RM0A000000000000000A","last_transition_time":1800000018000000}],"active_operation_id":null},"created_at":1800000000000000,"updated_at":1800000031000000}	3449638245
machine-2	MAINTENANCE	BUSY	{"id":"machine-2","spec":{"provider":"fake","mac_addresses":["02:00:00:00:00:02"],"ssh_endpoint":"root@10.0.0.2:22","bmc_endpoint":"","image":"ubuntu-24.04","target_cluster":"prod","network_config":""},"labels":{"rack":"r2","zone":"a"},"status":{"phase":"MAINTENANCE","conditions":[],"active_operation_id":"op-01MCC5RM0M000000000000000M"},"created_at":1800000000000000,"updated_at":1800000020000000}	2926342631
machine-3	READY	IDLE	{"id":"machine-3","spec":{"provider":"fake","mac_addresses":["02:00:00:00:00:03"],"ssh_endpoint":"root@10.0.0.3:22","bmc_endpoint":"","image":"ubuntu-24.04","target_cluster":"prod","network_config":""},"labels":{"rack":"r1","zone":"a"},"status":{"phase":"READY","conditions":[],"active_operation_id":null},"created_at":1800000000000000,"updated_at":1800000000000000}	2851322458
machine-4	FACTORY_READY	NEW	{"id":"machine-4","spec":{"provider":"fake","mac_addresses":["02:00:00:00:00:04"],"ssh_endpoint":"root@10.0.0.4:22","bmc_endpoint":"","image":"ubuntu-24.04","target_cluster":"prod","network_config":""},"labels":{"rack":"r2","zone":"a"},"status":{"phase":"FACTORY_READY","conditions":[],"active_operation_id":null},"created_at":1800000000000000,"updated_at":1800000000000000}	3210597743
\.


--
-- Data for Name: operations; Type: TABLE DATA; Schema: public; Owner: -
--

COPY public.operations (id, machine_id, type, phase, request_id, cancel_requested, lease_owner, lease_expires, lease_generation, doc, doc_crc32) FROM stdin;
op-01MCC5RM0Y000000000000000Y	machine-1	REBOOT	CANCELED	req-30	t	\N	\N	0	{"id":"op-01MCC5RM0Y000000000000000Y","machine_id":"machine-1","type":"REBOOT","phase":"CANCELED","request_id":"req-30","note":"note 30","current_stage":"","stages":[],"created_at":1800000030000000,"started_at":null,"finished_at":1800000031000000,"error":"canceled by an operator before its first stage","cancel_requested":true}	3255478547
op-01MCC5RM0M000000000000000M	machine-2	REBOOT	PENDING	req-20	f	\N	\N	0	{"id":"op-01MCC5RM0M000000000000000M","machine_id":"machine-2","type":"REBOOT","phase":"PENDING","request_id":"req-20","note":"note 20","current_stage":"","stages":[],"created_at":1800000020000000,"started_at":null,"finished_at":null,"error":null,"cancel_requested":false}	1020169149
op-01MCC5RM0A000000000000000A	machine-1	REIMAGE	SUCCEEDED	req-10	f	\N	\N	0	{"id":"op-01MCC5RM0A000000000000000A","machine_id":"machine-1","type":"REIMAGE","phase":"SUCCEEDED","request_id":"req-10","note":"note 10","current_stage":"repave","stages":[{"name":"set-netboot","outcome":"SUCCEEDED","attempts":1,"interruptions":0,"started_at":1800000012000000,"finished_at":1800000013000000,"last_error":null},{"name":"power-cycle","outcome":"SUCCEEDED","attempts":1,"interruptions":0,"started_at":1800000014000000,"finished_at":1800000015000000,"last_error":null},{"name":"repave","outcome":"SUCCEEDED","attempts":1,"interruptions":0,"started_at":1800000016000000,"finished_at":1800000017000000,"last_error":null}],"created_at":1800000010000000,"started_at":1800000011000000,"finished_at":1800000018000000,"error":null,"cancel_requested":false}	286856647
\.


--
-- Data for Name: schema_version; Type: TABLE DATA; Schema: public; Owner: -
--

COPY public.schema_version (version) FROM stdin;
1
\.


--
-- Name: counters counters_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.counters
    ADD CONSTRAINT counters_pkey PRIMARY KEY (name);


--
-- Name: events events_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.events
    ADD CONSTRAINT events_pkey PRIMARY KEY (revision);


--
-- Name: logs logs_log_revision_key; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.logs
    ADD CONSTRAINT logs_log_revision_key UNIQUE (log_revision);


--
-- Name: logs logs_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.logs
    ADD CONSTRAINT logs_pkey PRIMARY KEY (operation_id, sequence);


--
-- Name: machine_macs machine_macs_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.machine_macs
    ADD CONSTRAINT machine_macs_pkey PRIMARY KEY (mac);


--
-- Name: machines machines_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.machines
    ADD CONSTRAINT machines_pkey PRIMARY KEY (id);


--
-- Name: operations operations_machine_id_request_id_key; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.operations
    ADD CONSTRAINT operations_machine_id_request_id_key UNIQUE (machine_id, request_id);


--
-- Name: operations operations_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.operations
    ADD CONSTRAINT operations_pkey PRIMARY KEY (id);


--
-- Name: events_by_machine; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX events_by_machine ON public.events USING btree (machine_id, revision);


--
-- Name: events_by_operation; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX events_by_operation ON public.events USING btree (operation_id, revision);


--
-- Name: machine_macs_by_machine; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX machine_macs_by_machine ON public.machine_macs USING btree (machine_id);


--
-- Name: operations_by_machine; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX operations_by_machine ON public.operations USING btree (machine_id, id);


--
-- Name: operations_by_owner; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX operations_by_owner ON public.operations USING btree (lease_owner) WHERE (lease_owner IS NOT NULL);


--
-- Name: operations_lease_expiry; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX operations_lease_expiry ON public.operations USING btree (lease_expires) WHERE ((phase = ANY (ARRAY['PENDING'::text, 'RUNNING'::text])) AND (lease_owner IS NOT NULL));


--
-- Name: operations_one_active; Type: INDEX; Schema: public; Owner: -
--

CREATE UNIQUE INDEX operations_one_active ON public.operations USING btree (machine_id) WHERE (phase = ANY (ARRAY['PENDING'::text, 'RUNNING'::text]));


--
-- Name: operations_unheld; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX operations_unheld ON public.operations USING btree (id) WHERE ((phase = ANY (ARRAY['PENDING'::text, 'RUNNING'::text])) AND (lease_owner IS NULL));


--
-- PostgreSQL database dump complete
--

\unrestrict FQgEKKv2Ms2BrJ64vvhGOSvSice8pCTWp9hWoQhieV9hKczoCIvEYdCdht6cQu0


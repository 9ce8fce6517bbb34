// A C++ StackFlow-style unit node for interop tests, written against the libzmq C API the
// way Edge-LLM-Infra's pzmq.hpp / StackFlow.cpp / node/test do it on the wire:
//   - RPC server: REP bound at ipc://<dir>/rpc.<unit>; request = [action, data], reply one
//     frame; data = set_param(client_url, raw_json); answers "None" at once and hands the
//     work to an event thread ("NotAction" for unknown actions, list_action answered);
//   - sys calls: a new context + REQ socket per call, two frames, 3 s timeouts;
//   - register_unit reply parsed with get_param: set_param(n, set_param(out_url, inf_url));
//   - per task: PUB bound at the output url, SUB on the inference url (all topics), PUSH to
//     the client's zmq_com; each inference answered with the input text, "hello", and the
//     empty final piece; envelopes with sorted keys plus "\n" (nlohmann::json::dump());
//   - an empty inference (delta "") is error -24, sent as StackFlow::send sends errors: to
//     the client url of the last RPC action, with that action's request_id and the bare
//     unit name as work_id (node/test's task_user_data).
// JSON is read with crude key search, as upstream's sample_json_str_get does.
//
// Usage: stackflow_node <runtime_dir> [unit_name]; prints "node ready"; SIGTERM stops it.
#include <zmq.h>

#include <atomic>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <map>
#include <memory>
#include <mutex>
#include <queue>
#include <string>
#include <thread>
#include <condition_variable>
#include <unistd.h>

static std::atomic<bool> g_stop(false);
static std::string g_dir, g_unit;
// StackFlow::request_id_ / out_zmq_url_: set by every RPC action, used by send().
static std::mutex g_last_mtx;
static std::string g_last_request_id, g_last_url;

static std::string set_param(const std::string &p0, const std::string &p1) {
    std::string out(1, (char)p0.size());
    return out + p0 + p1;
}
static std::string get_param(const std::string &data, int index) {
    if (data.empty()) return "";
    size_t n = (unsigned char)data[0];
    if (1 + n > data.size()) return "";
    return index % 2 == 0 ? data.substr(1, n) : data.substr(1 + n);
}

// The string value of "key" (first occurrence), unescaping \" and \\ only.
static std::string json_str(const std::string &raw, const std::string &key) {
    std::string pat = "\"" + key + "\"";
    size_t pos = raw.find(pat);
    if (pos == std::string::npos) return "";
    pos = raw.find(':', pos + pat.size());
    if (pos == std::string::npos) return "";
    pos = raw.find('"', pos);
    if (pos == std::string::npos) return "";
    std::string out;
    for (size_t i = pos + 1; i < raw.size(); i++) {
        char c = raw[i];
        if (c == '\\' && i + 1 < raw.size()) { out += raw[++i]; continue; }
        if (c == '"') break;
        out += c;
    }
    return out;
}
static bool json_true(const std::string &raw, const std::string &key) {
    std::string pat = "\"" + key + "\"";
    size_t pos = raw.find(pat);
    if (pos == std::string::npos) return false;
    pos = raw.find(':', pos);
    while (pos != std::string::npos && ++pos < raw.size() && raw[pos] == ' ') {}
    return pos != std::string::npos && raw.compare(pos, 4, "true") == 0;
}
static std::string quote(const std::string &s) {
    std::string out = "\"";
    for (char c : s) {
        if (c == '"' || c == '\\') { out += '\\'; out += c; }
        else if ((unsigned char)c < 0x20) { char b[8]; snprintf(b, sizeof b, "\\u%04x", c); out += b; }
        else out += c;
    }
    return out + "\"";
}
static std::string envelope(const std::string &request_id, const std::string &work_id,
                            const std::string &object, const std::string &data_json, int code,
                            const std::string &message) {
    return "{\"created\":" + std::to_string((long)time(nullptr)) + ",\"data\":" + data_json +
           ",\"error\":{\"code\":" + std::to_string(code) + ",\"message\":" + quote(message) +
           "},\"object\":" + quote(object) + ",\"request_id\":" + quote(request_id) +
           ",\"work_id\":" + quote(work_id) + "}\n";
}

// pzmq::call_rpc_action: new context and REQ per call.
static std::string unit_call(const std::string &service, const std::string &action, const std::string &data) {
    std::string path = g_dir + "/rpc." + service;
    if (access(path.c_str(), F_OK) != 0) return "";
    void *ctx = zmq_ctx_new();
    void *req = zmq_socket(ctx, ZMQ_REQ);
    int timeout = 3000, linger = 0;
    zmq_setsockopt(req, ZMQ_SNDTIMEO, &timeout, sizeof timeout);
    zmq_setsockopt(req, ZMQ_RCVTIMEO, &timeout, sizeof timeout);
    zmq_setsockopt(req, ZMQ_LINGER, &linger, sizeof linger);
    zmq_connect(req, ("ipc://" + path).c_str());
    zmq_send(req, action.data(), action.size(), ZMQ_SNDMORE);
    zmq_send(req, data.data(), data.size(), 0);
    zmq_msg_t msg;
    zmq_msg_init(&msg);
    std::string out;
    if (zmq_msg_recv(&msg, req, 0) >= 0) out.assign((char *)zmq_msg_data(&msg), zmq_msg_size(&msg));
    zmq_msg_close(&msg);
    zmq_close(req);
    zmq_ctx_term(ctx);
    return out;
}

// StackFlow::send: a new PUSH for every message.
static void push_once(void *ctx, const std::string &url, const std::string &out) {
    void *push = zmq_socket(ctx, ZMQ_PUSH);
    int timeout = 3000, linger = 1000;
    zmq_setsockopt(push, ZMQ_SNDTIMEO, &timeout, sizeof timeout);
    zmq_setsockopt(push, ZMQ_LINGER, &linger, sizeof linger);
    zmq_connect(push, url.c_str());
    zmq_send(push, out.data(), out.size(), 0);
    zmq_close(push);
}

struct Task {
    int number;
    std::string work_id, out_url, inf_url, response_format;
    void *pub = nullptr;
    std::atomic<bool> stop{false};
    std::thread thread;
};

static void task_loop(void *ctx, Task *task) {
    void *sub = zmq_socket(ctx, ZMQ_SUB);
    int ivl = 100, ivl_max = 1000, linger = 0;
    zmq_setsockopt(sub, ZMQ_RECONNECT_IVL, &ivl, sizeof ivl);
    zmq_setsockopt(sub, ZMQ_RECONNECT_IVL_MAX, &ivl_max, sizeof ivl_max);
    zmq_setsockopt(sub, ZMQ_LINGER, &linger, sizeof linger);
    zmq_connect(sub, task->inf_url.c_str());
    zmq_setsockopt(sub, ZMQ_SUBSCRIBE, "", 0);
    void *push = nullptr;
    std::string push_url;
    while (!task->stop && !g_stop) {
        zmq_pollitem_t item = {sub, 0, ZMQ_POLLIN, 0};
        if (zmq_poll(&item, 1, 100) <= 0) continue;
        zmq_msg_t msg;
        zmq_msg_init(&msg);
        if (zmq_msg_recv(&msg, sub, 0) < 0) { zmq_msg_close(&msg); continue; }
        std::string raw((char *)zmq_msg_data(&msg), zmq_msg_size(&msg));
        zmq_msg_close(&msg);
        std::string zmq_com = json_str(raw, "zmq_com");
        if (!zmq_com.empty() && zmq_com != push_url) {  // llm_channel_obj::set_push_url
            if (push) zmq_close(push);
            push = zmq_socket(ctx, ZMQ_PUSH);
            int timeout = 3000;
            zmq_setsockopt(push, ZMQ_SNDTIMEO, &timeout, sizeof timeout);
            zmq_setsockopt(push, ZMQ_LINGER, &linger, sizeof linger);
            zmq_connect(push, zmq_com.c_str());
            push_url = zmq_com;
        }
        std::string request_id = json_str(raw, "request_id");
        if (!json_true(raw, "finish")) continue;
        std::string text = json_str(raw, "delta");
        if (text.empty()) {
            std::string rid, url;
            {
                std::lock_guard<std::mutex> lock(g_last_mtx);
                rid = g_last_request_id;
                url = g_last_url;
            }
            push_once(ctx, url, envelope(rid, g_unit, "None", "\"None\"", -24, "The inference data is empty."));
            continue;
        }
        const std::string deltas[3] = {text, "hello", ""};
        for (int i = 0; i < 3; i++) {
            std::string data = "{\"delta\":" + quote(deltas[i]) + ",\"finish\":" + (i == 2 ? "true" : "false") +
                               ",\"index\":" + std::to_string(i) + "}";
            std::string out = envelope(request_id, task->work_id, task->response_format, data, 0, "");
            zmq_send(task->pub, out.data(), out.size(), 0);
            if (push) zmq_send(push, out.data(), out.size(), 0);
        }
    }
    if (push) zmq_close(push);
    zmq_close(sub);
}

struct Event { std::string action, zmq_url, raw; };
static std::mutex g_mtx;
static std::condition_variable g_cv;
static std::queue<Event> g_events;

static void event_loop(void *ctx) {
    std::map<int, std::unique_ptr<Task>> tasks;
    while (!g_stop) {
        Event ev;
        {
            std::unique_lock<std::mutex> lock(g_mtx);
            g_cv.wait_for(lock, std::chrono::milliseconds(100), [] { return !g_events.empty(); });
            if (g_events.empty()) continue;
            ev = g_events.front();
            g_events.pop();
        }
        std::string request_id = json_str(ev.raw, "request_id");
        std::string work_id = json_str(ev.raw, "work_id");
        {
            std::lock_guard<std::mutex> lock(g_last_mtx);
            g_last_request_id = request_id;
            g_last_url = ev.zmq_url;
        }
        if (ev.action == "setup") {
            std::string reply = unit_call("sys", "register_unit", g_unit);
            std::string str_port = get_param(reply, 1);
            auto task = std::make_unique<Task>();
            task->number = std::stoi(get_param(reply, 0));
            task->out_url = get_param(str_port, 0);
            task->inf_url = get_param(str_port, 1);
            task->work_id = g_unit + "." + std::to_string(task->number);
            task->response_format = json_str(ev.raw, "response_format");
            task->pub = zmq_socket(ctx, ZMQ_PUB);
            zmq_bind(task->pub, task->out_url.c_str());
            Task *t = task.get();
            t->thread = std::thread(task_loop, ctx, t);
            std::string wid = t->work_id;
            tasks[t->number] = std::move(task);
            push_once(ctx, ev.zmq_url, envelope(request_id, wid, "None", "\"None\"", 0, ""));
        } else if (ev.action == "exit" || ev.action == "taskinfo") {
            size_t dot = work_id.find('.');
            int number = dot == std::string::npos ? -1 : std::stoi(work_id.substr(dot + 1));
            auto it = tasks.find(number);
            if (ev.action == "taskinfo" && dot == std::string::npos) {
                std::string list = "[";
                for (auto &kv : tasks) list += (list.size() > 1 ? "," : "") + quote(kv.second->work_id);
                push_once(ctx, ev.zmq_url, envelope(request_id, work_id, g_unit + ".tasklist", list + "]", 0, ""));
            } else if (it == tasks.end()) {
                push_once(ctx, ev.zmq_url, envelope(request_id, work_id, "None", "\"None\"", -6, "Unit Does Not Exist"));
            } else if (ev.action == "taskinfo") {
                std::string info = "{\"response_format\":" + quote(it->second->response_format) + "}";
                push_once(ctx, ev.zmq_url, envelope(request_id, work_id, g_unit + ".taskinfo", info, 0, ""));
            } else {
                it->second->stop = true;
                it->second->thread.join();
                zmq_close(it->second->pub);
                tasks.erase(it);
                push_once(ctx, ev.zmq_url, envelope(request_id, work_id, "None", "\"None\"", 0, ""));
                unit_call("sys", "release_unit", work_id);
            }
        }
    }
    for (auto &kv : tasks) {
        kv.second->stop = true;
        kv.second->thread.join();
        zmq_close(kv.second->pub);
        unit_call("sys", "release_unit", kv.second->work_id);
    }
}

int main(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: %s runtime_dir [unit]\n", argv[0]); return 2; }
    g_dir = argv[1];
    g_unit = argc > 2 ? argv[2] : "llm";
    signal(SIGTERM, [](int) { g_stop = true; });
    signal(SIGINT, [](int) { g_stop = true; });
    void *ctx = zmq_ctx_new();
    void *rep = zmq_socket(ctx, ZMQ_REP);
    int linger = 0;
    zmq_setsockopt(rep, ZMQ_LINGER, &linger, sizeof linger);
    std::string rpc_path = g_dir + "/rpc." + g_unit;
    if (zmq_bind(rep, ("ipc://" + rpc_path).c_str()) != 0) { perror("bind"); return 1; }
    std::thread events(event_loop, ctx);
    printf("node ready\n");
    fflush(stdout);
    while (!g_stop) {
        zmq_pollitem_t item = {rep, 0, ZMQ_POLLIN, 0};
        if (zmq_poll(&item, 1, 100) <= 0) continue;
        std::string frames[2];
        for (int i = 0; i < 2; i++) {
            zmq_msg_t msg;
            zmq_msg_init(&msg);
            zmq_msg_recv(&msg, rep, 0);
            frames[i].assign((char *)zmq_msg_data(&msg), zmq_msg_size(&msg));
            int more = zmq_msg_more(&msg);
            zmq_msg_close(&msg);
            if (!more) break;
        }
        std::string reply;
        if (frames[0] == "list_action") {
            reply = "{\"actions\":[\"list_action\",\"setup\",\"exit\",\"taskinfo\"]}";
        } else if (frames[0] == "setup" || frames[0] == "exit" || frames[0] == "taskinfo") {
            {
                std::lock_guard<std::mutex> lock(g_mtx);
                g_events.push({frames[0], get_param(frames[1], 0), get_param(frames[1], 1)});
            }
            g_cv.notify_one();
            reply = "None";
        } else {
            reply = "NotAction";
        }
        zmq_send(rep, reply.data(), reply.size(), 0);
    }
    events.join();
    zmq_close(rep);
    unlink(rpc_path.c_str());
    zmq_ctx_term(ctx);
    return 0;
}

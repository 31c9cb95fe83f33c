// The quality monitor's options as icecached runs them: its config's
// quality section (proto/icecache/v1/config.proto QualityConfig, defaulted
// by ApplyDefaults) turned into the core's SessionQualityOptions. The daemon
// and the in-process decode benchmark both take them from here, so the
// benchmark's in-process runs calibrate, carry and pool widths as the
// daemon does.
#ifndef ICECACHE_SERVER_RPC_QUALITY_OPTIONS_H_
#define ICECACHE_SERVER_RPC_QUALITY_OPTIONS_H_

#include "icecache/v1/config.pb.h"
#include "server/session/session_quality.h"

namespace icecache::rpc {

// `q` as the core takes it (every field; a defaulted config's).
SessionQualityOptions QualityOptionsFromConfig(const v1::QualityConfig& q);

// icecached's options with no config file and no flags.
SessionQualityOptions DaemonDefaultQualityOptions();

}  // namespace icecache::rpc

#endif  // ICECACHE_SERVER_RPC_QUALITY_OPTIONS_H_

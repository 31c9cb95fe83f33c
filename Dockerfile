# syntax=docker/dockerfile:1
# IceCache daemon image. Build:   docker build -t icecache:dev .
# Run (node-local, shares /dev/shm and the socket dir with the inference server):
#   docker run --ipc=host -v /run/icecache:/run/icecache icecache:dev
FROM debian:bookworm AS build
WORKDIR /src
COPY . .
# dev.sh installs exactly the Debian packages the build needs.
RUN BUILD_DIR=/src/build deploy/dev.sh build \
 && mkdir -p /opt/icecache/bin \
 && for b in server/icecached client/icecachectl client/icecache-demo common/icecache-kvgen; do \
      cp "/src/build/$b" /opt/icecache/bin/; done

FROM debian:bookworm-slim
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      libgrpc++1.51 libgrpc29 libprotobuf32 libtbb12 libabsl20220623 libcpp-httplib0.11 libssl3 \
      ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 990 --home /nonexistent --shell /usr/sbin/nologin icecache \
 && mkdir -p /run/icecache /etc/icecache && chown icecache:icecache /run/icecache
COPY --from=build /opt/icecache/bin/ /usr/local/bin/
COPY deploy/icecached.textproto /etc/icecache/icecached.textproto
USER icecache
EXPOSE 9464
ENTRYPOINT ["/usr/local/bin/icecached", "--config=/etc/icecache/icecached.textproto"]

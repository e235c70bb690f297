export PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=1
S=$(date +%s)
( time env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 python3 -m pip install -v --no-index --no-build-isolation --no-deps -e . ) > $OUT/build-v.log 2>&1
so=$(ls dbn_kernels/_C*.so)
{ ls -la $so; ldd $so; echo "std:: defined: $(nm -C $so | grep -c ' [TtWw] std::')"; nm -C $so | grep 'basic_ostream\|locale' | head -20; python3 -c "import sysconfig as s; [print(k, s.get_config_var(k)) for k in ('LDSHARED','LDFLAGS','CXX','CC','CFLAGS')]"; c++ --version; g++ --version; which c++ g++ gcc; env | grep -i 'flags\|^CC\|^CXX\|LD_'; } > $OUT/so.log 2>&1
echo "build+so $(( $(date +%s) - S )) s"
timeout 50 python3 .devrun/steady.py > $OUT/steady.log 2>&1; echo "steady rc=$? $(( $(date +%s) - S )) s"
timeout 70 python3 -m pytest -v -n 4 -p no:cacheprovider -m gpu tests --timeout 50 --deselect "tests/test_cuda.py::test_invalid_input_leaves_buffers_alone[cuda]" --junitxml $OUT/gpu.junit.xml > $OUT/tests.log 2>&1; echo "tests rc=$? $(( $(date +%s) - S )) s"
